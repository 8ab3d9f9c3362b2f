"""What `generate` does, piece by piece: draw and write the splits (timed), then log them.

stages/generate.py reads as the flow and imports this module once params.yaml is valid.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from pipeline import config, data, dvc_params, files, tracking
from stages import common


class Generated(NamedTuple):
    """The ground truth written to truth.json, and how long drawing and writing the splits took."""

    truth: data.Truth
    seconds: float


def write_data(cfg: config.Config) -> Generated:
    """Generate the splits and truth.json, each atomically."""
    d = cfg.data
    start = time.perf_counter()
    truth = data.generate(
        common.DATA, seed=cfg.seed, n_samples=d.n_samples, n_features=d.n_features,
        noise_std=d.noise_std, nonlinearity=d.nonlinearity, rows=d.split.sizes(d.n_samples),
    )
    seconds = time.perf_counter() - start
    files.write_json(common.DATA / "truth.json", truth.to_dict())
    return Generated(truth, seconds)


def log_generated(run: tracking.StageRun, cfg: config.Config, generated: Generated, digests: dict[str, str]) -> None:
    """Params, the three datasets, row counts and speed, and the true weights (the stage's weight artifact)."""
    truth, seconds = generated
    run.log_params(dvc_params.stage_params(cfg, "generate"))
    for split in data.SPLITS:
        run.log_dataset(common.split_path(split), split, digests[split], split, truth.rows[split])
    run.log_metrics({f"rows_{s}": n for s, n in truth.rows.items()} | {
        "generate_seconds": seconds, "rows_per_second": cfg.data.n_samples / seconds,
    })
    run.log_dict({"w_true": truth.w_true, "b_true": truth.b_true}, "weights/true_weights.json")
    run.log_artifact(common.DATA / "truth.json")
