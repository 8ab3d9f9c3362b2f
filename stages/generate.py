"""DVC stage `generate`: draw the data, write the splits and truth.json, log to MLflow."""

from __future__ import annotations

import time
from typing import Any

from pipeline import config
from stages import common


def write_data(cfg: config.Config) -> tuple[Any, float]:
    """Generate the splits and truth.json (atomically); return (truth, seconds)."""
    from pipeline import data, files

    d = cfg.data
    rows = d.split.sizes(d.n_samples)
    start = time.perf_counter()
    truth = data.generate(
        common.DATA, seed=cfg.seed, n_samples=d.n_samples, n_features=d.n_features,
        noise_std=d.noise_std, nonlinearity=d.nonlinearity, rows=rows,
    )
    seconds = time.perf_counter() - start
    files.write_json(common.DATA / "truth.json", truth.to_dict())
    return truth, seconds


def run(cfg: config.Config) -> None:
    """Generate, then record params, datasets and the true weights in MLflow."""
    from pipeline import data, tracking

    tracking.preflight()  # a store that is down fails here, before any data is drawn
    truth, seconds = write_data(cfg)
    rows = truth.rows
    digests = common.data_digests()

    stage = "generate"
    tags = {"device": "cpu", "data.digest": data.combined_digest(digests)}
    with tracking.stage_run(stage, cfg.mlflow.experiment, common.run_name(stage), tags) as run:
        run.log_params(config.stage_params(cfg, stage))
        for split in data.SPLITS:
            run.log_dataset(common.split_path(split), split, digests[split], split, rows[split])
        run.log_metrics({f"rows_{s}": n for s, n in rows.items()} | {
            "generate_seconds": seconds, "rows_per_second": cfg.data.n_samples / seconds,
        })
        run.log_dict({"w_true": truth.w_true, "b_true": truth.b_true}, "weights/true_weights.json")
        run.log_artifact(common.DATA / "truth.json")


if __name__ == "__main__":
    common.main("generate", run, [*map(common.split_path, ("train", "val", "test")), common.DATA / "truth.json"])
