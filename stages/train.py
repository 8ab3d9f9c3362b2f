"""DVC stage `train@<model>`: train one model, write its weights and curves, log to MLflow.

Usage: python -m stages.train {linear_gd,linear,mlp}
"""

from __future__ import annotations

import sys

from pipeline import config
from pipeline.errors import PipelineError
from stages import common


def main() -> None:
    """Check the argument, load params.yaml (one line and exit 2 when it is bad), then `run`."""
    if len(sys.argv) != 2 or sys.argv[1] not in config.MODEL_NAMES:
        print(f"usage: python -m stages.train {{{','.join(config.MODEL_NAMES)}}}", file=sys.stderr)
        sys.exit(2)
    name = sys.argv[1]
    outputs = [common.weights_path(name), common.loss_plot_path(name), common.METRICS / "train" / f"{name}.json"]
    common.main(f"train@{name}", lambda cfg: run(cfg, name), outputs)


def run(cfg: config.Config, name: str) -> None:
    """Train one model here, or the mlp over `mlp.distributed.nproc` torchrun ranks, each running this again."""
    # torch loads here, once params.yaml is known to be valid; mlflow only after the device check below
    from pipeline.device import resolve_device, seed_everything
    from stages import distributed

    # Cheap checks first: `device: cuda` without CUDA fails right after torch is imported,
    # and a tracking server that is down fails in seconds, both before any data is read.
    nproc = cfg.mlp.distributed.nproc if name == "mlp" else 1
    rank = distributed.launched()
    device = resolve_device(cfg.device)
    if rank is None and nproc > 1:
        distributed.check_devices(device, nproc, "mlp.distributed.nproc")
        distributed.launch(nproc, "stages.train", name)  # every rank runs this stage again, and lands below
        return
    if rank is not None and (name != "mlp" or rank.world != nproc):
        raise PipelineError(
            f"started by torchrun with WORLD_SIZE={rank.world}, but only train@mlp runs data-parallel, "
            f"with mlp.distributed.nproc processes (now {nproc}); run `python -m stages.train {name}` directly"
        )
    from pipeline import data, tracking
    from pipeline.training import Diverged
    from stages import train_core

    shard = (rank.rank, rank.world) if rank else (0, 1)
    lead = shard[0] == 0  # the other ranks train their shards; the lead writes and logs
    with distributed.process_group(rank, device) as (device, backend):
        if lead:
            tracking.preflight()
        seed_everything(cfg.seed)
        truth = data.read_truth(common.DATA / "truth.json")
        splits = train_core.load_splits(truth, device)
        if not lead:
            train_core.train(cfg, name, splits, shard, progress=False)
            return
        digests = common.data_digests()
        tags = train_core.run_tags(name, device, shard, backend, data.combined_digest(digests))
        with tracking.stage_run(f"train@{name}", cfg.mlflow.experiment, common.run_name(f"train@{name}"), tags) as mlflow_run:
            train_core.log_inputs(mlflow_run, cfg, name, truth, digests)
            try:
                trained = train_core.train(cfg, name, splits, shard)
            except Diverged as exc:
                raise train_core.log_diverged(mlflow_run, cfg, name, exc) from None
            train_core.write_outputs(name, trained)
            train_core.log_trained(mlflow_run, name, trained, splits.X_val[:5])


if __name__ == "__main__":
    main()
