"""DVC stage `generate`: draw the data, write the splits and truth.json, log to MLflow."""

from __future__ import annotations

from pipeline import config
from stages import common


def main() -> None:
    """Load params.yaml (one line and exit 2 when it is bad), then `run`."""
    common.main("generate", run, [*map(common.split_path, ("train", "val", "test")), common.DATA / "truth.json"])


def run(cfg: config.Config) -> None:
    """Generate, then record params, datasets and the true weights in MLflow."""
    # numpy, pyarrow and mlflow load here, once params.yaml is known to be valid
    from pipeline import data, tracking
    from stages.generate_core import log_generated, write_data

    tracking.preflight()  # a store that is down fails here, before any data is drawn
    generated = write_data(cfg)
    digests = common.data_digests()
    tags = {"device": "cpu", "data.digest": data.combined_digest(digests)}
    with tracking.stage_run("generate", cfg.mlflow.experiment, common.run_name("generate"), tags) as mlflow_run:
        log_generated(mlflow_run, cfg, generated, digests)


if __name__ == "__main__":
    main()
