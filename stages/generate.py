"""DVC stage `generate`: draw the data, write the splits and truth.json, log them to MLflow.

`python -m stages generate` (stages/__main__.py checks params.yaml first, then calls `run`).
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import config, data, dvc_params, files, tracking
from stages import paths


def outputs() -> list[Path]:
    """The stage's DVC outputs (named in the line printed when it is interrupted)."""
    return [*map(paths.split_path, data.SPLITS), paths.TRUTH]


def run(cfg: config.Config) -> None:
    """Open the run, generate and write the splits, then log params, datasets, speed and the true weights."""
    d = cfg.data
    data.check_fits(d.n_samples, d.n_features, paths.DATA)  # refused in one line before any work when too big
    with tracking.stage_run("generate", cfg.mlflow.experiment, {"device": "cpu"},
                            wait=cfg.mlflow.wait_seconds) as mlflow_run:
        # compute and write: the splits block by block, then truth.json, published together
        start = time.perf_counter()
        with files.publish() as out:
            truth = data.generate(
                {split: out.path(paths.split_path(split)) for split in data.SPLITS}, seed=cfg.seed,
                n_samples=d.n_samples, n_features=d.n_features, noise_std=d.noise_std,
                nonlinearity=d.nonlinearity, rows=d.split.sizes(d.n_samples),
            )
            files.write_json(out.path(paths.TRUTH), truth.to_dict())
        seconds = time.perf_counter() - start
        digests = truth.digests  # the md5 of each split, computed as it was written

        # log
        mlflow_run.set_tags({"data.digest": data.combined_digest(digests)})
        mlflow_run.log_params(dvc_params.stage_params(cfg, "generate"))
        for split in data.SPLITS:
            mlflow_run.log_dataset(paths.split_path(split), split, digests[split], split, truth.rows[split])
        mlflow_run.log_metrics({f"rows_{s}": n for s, n in truth.rows.items()} | {
            "generate_seconds": seconds, "rows_per_second": d.n_samples / seconds,
        })
        mlflow_run.log_dict({"w_true": truth.w_true, "b_true": truth.b_true}, "weights/true_weights.json")
        mlflow_run.log_artifact(paths.TRUTH)
