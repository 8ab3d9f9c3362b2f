"""DVC stage `train@<model>`: train one model, write its weights, curves and metrics, log them to MLflow.

`python -m stages train <model>`, a model params.yaml's `models` lists (stages/__main__.py checks params.yaml
first, then calls `run`); the model's module in pipeline/zoo/ trains it. A model that trains data-parallel
(`<model>.distributed.nproc` > 1) starts the stage again under torchrun, once per rank (stages/distributed.py):
every rank trains its slice of each batch, and rank 0 writes and logs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint, config, cores, data, device, dvc_params, files, models, plots, tracking, training, zoo
from pipeline.errors import PipelineError
from pipeline.tracking import study
from stages import distributed, paths

SWEEP_VIEW = "{}-sweep"  # a model's sweep in the UI: ?viewStateShareKey=<model>-sweep (docs/mlflow-ui.md)
SWEEP_METRICS = ["test_mse", "ratio_to_noise_floor", "best_val_loss"]
# the models side by side (?viewStateShareKey=models): every training run's neutral params
# (zoo.NEUTRAL_PARAMS) beside the metrics every model has; evaluate copies the test scores here
MODELS_VIEW = "models"
MODELS_METRICS = ["test_mse", "ratio_to_least_squares", "ratio_to_noise_floor", "best_val_loss", "train_seconds"]


def outputs(name: str) -> list[Path]:
    """The stage's DVC outputs (named in the line printed when it is interrupted)."""
    return [paths.weights_path(name), paths.loss_plot_path(name), paths.loss_plot_path(name, ".png"),
            paths.train_metrics_path(name)]


def run(cfg: config.Config, name: str) -> None:
    """Train model `name` here, or over `<name>.distributed.nproc` torchrun ranks for a model that trains data-parallel."""
    nproc = cfg.model(name).processes()
    model = zoo.module(name)  # what the pipeline knows of the model: its curve's axis, checkpoint unit, neutral params
    rank = distributed.launched()
    if rank is None:  # before any work, data that is not what generate wrote stops here (torchrun's ranks: checked)
        paths.verified_split_digests(data.read_truth(paths.TRUTH))
    where = device.prepare(cfg.device, cfg.seed, cores.claim(torch.get_num_threads()))
    if rank is None and nproc > 1:
        distributed.check_devices(where, nproc, f"{name}.distributed.nproc")
        distributed.launch(nproc, "train", name)  # every rank runs this stage again, and lands below
        return
    if rank is not None and rank.world != nproc:
        raise PipelineError(
            f"started by torchrun with WORLD_SIZE={rank.world}, but train@{name} runs {nproc} process(es) "
            f"({name}.distributed.nproc where the model has it); run `python -m stages train {name}` directly"
        )
    with distributed.process_group(rank, where) as group:
        checkpoints, resume = open_checkpoint(cfg, name, group.lead)
        if not group.lead:  # the other ranks train their shards; the lead writes and logs
            with checkpoints.deferring_interrupts():
                fit(cfg, name, read_splits(data.read_truth(paths.TRUTH), group.device), group, checkpoints, resume,
                    progress=False)
            return
        tags = {"device": str(group.device), "model": name} | group.tags()
        if resume is not None:
            tags["resumed.from_epoch"] = str(resume["loop"]["done"])  # a model saving by step: the step
        run_id = resume["meta"]["run_id"] if resume is not None else None
        m = cfg.mlflow
        with tracking.stage_run(f"train@{name}", m.experiment, tags, resume=run_id, wait=m.wait_seconds,
                                system_metrics=m.system_metrics_seconds if m.system_metrics else None) as mlflow_run:
            checkpoints.meta = {"run_id": mlflow_run.run_id}  # the run a resumed stage continues
            # read
            truth = data.read_truth(paths.TRUTH)
            splits = read_splits(truth, group.device)
            digests = truth.digests  # the files' md5, checked against them before the run was opened
            data_digest = data.combined_digest(digests)
            params = dvc_params.stage_params(cfg, f"train@{name}")
            mlflow_run.set_tags({"data.digest": data_digest})
            mlflow_run.log_params(params)
            # the UI view for sweeps: every run of this model, its params beside its test MSE
            mlflow_run.save_view(SWEEP_VIEW.format(name), f"tags.stage = 'train@{name}'",
                                 [p for p in params if p.startswith(f"{name}.")], SWEEP_METRICS)
            mlflow_run.link_generate_run(data_digest)
            for split in ("train", "val"):
                mlflow_run.log_dataset(paths.split_path(split), split, digests[split], split, truth.rows[split])

            # compute (the curves and progress reach the run while it trains: every mlflow.flush_seconds)
            live = tracking.LiveReport(mlflow_run, f"train@{name}", model.CHECKPOINT_UNIT, m.flush_seconds)
            try:
                with checkpoints.deferring_interrupts():  # SIGTERM/Ctrl-C: save at the end of the epoch, then stop
                    result, spec = fit(cfg, name, splits, group, checkpoints, resume, report=live)
            except training.Diverged as exc:
                mlflow_run.log_curve("train_loss", exc.history.step, exc.history.train_loss)
                mlflow_run.log_curve("val_loss", exc.history.step, exc.history.val_loss)
                lr = getattr(cfg.model(name), "lr", None)  # a model with a learning rate: the knob to turn
                hint = f"try a smaller {name}.lr (now {lr:g}, e.g. {lr / 10:g})" if lr else f"check the {name} block"
                raise PipelineError(
                    f"training diverged: the loss became {exc.loss} at step {exc.step}; {hint}. No model was written."
                ) from None
            summary = {
                "final_train_loss": result.history.train_loss[-1],
                "best_val_loss": min(result.history.val_loss),
                "best_step": result.best_step,
                "steps_run": result.history.step[-1] + 1,
                "stopped_early": int(result.stopped_early),
                "n_parameters": models.count_parameters(result.model),
                **result.extra,
            }

            # write: weights, loss curve (CSV and PNG), summary metrics, published together
            # (wall time stays out of the metrics file: a rerun writes the same bytes)
            steps = result.step_losses  # gradient descent: the loss of every step, not just the logged ones
            train_curve = (range(len(steps)), steps) if steps else (result.history.step, result.history.train_loss)
            x_label = model.X_LABEL
            with files.publish() as out:
                models.save_weights(result.model, spec, out.path(paths.weights_path(name)))
                files.write_csv(out.path(paths.loss_plot_path(name)), ["step", "train_loss", "val_loss"],
                                result.history.rows())
                plots.loss_curves(out.path(paths.loss_plot_path(name, ".png")),
                                  f"{name}: loss per {x_label.split(' (')[0]}", x_label, train_curve,
                                  (result.history.step, result.history.val_loss))
                files.write_metrics(out.path(paths.train_metrics_path(name)), summary)

            # log
            neutral = model.neutral(cfg.model(name), truth.rows["train"])
            mlflow_run.log_params({"model": name} | neutral | {"parameters": summary["n_parameters"]})
            mlflow_run.save_view(MODELS_VIEW, "tags.stage LIKE 'train@%'", zoo.NEUTRAL_PARAMS, MODELS_METRICS)
            mlflow_run.log_curve("train_loss", *train_curve)  # the points not sent while training
            mlflow_run.log_curve("val_loss", result.history.step, result.history.val_loss)
            live.send()  # and the last progress tags
            mlflow_run.log_metrics(summary | {"train_seconds": result.seconds})
            mlflow_run.set_tags({"training.loop": result.loop})
            mlflow_run.log_artifact(paths.weights_path(name), "weights")
            mlflow_run.log_artifact(paths.loss_plot_path(name, ".png"), "plots/loss")
            mlflow_run.log_torch_model(paths.weights_path(name), splits.X_val[:5].cpu().numpy())
            mlflow_run.set_tags({"model.digest": files.md5_file(paths.weights_path(name)),
                                 "n_parameters": summary["n_parameters"]})
            checkpoint.remove(checkpoints.path)  # finished: the outputs are what a rerun would give


def open_checkpoint(cfg: config.Config, name: str, lead: bool) -> tuple[checkpoint.Checkpoints, dict[str, Any] | None]:
    """The stage's checkpoint hook, and the state to resume from when a usable checkpoint is there (one line why not).

    The key covers what the outputs depend on: the stage's params and its dvc.yaml deps (code and data).
    Every rank reads the same file; only the lead writes.
    """
    stage = f"train@{name}"
    key = checkpoint.key(dvc_params.stage_params(cfg, stage), dvc_params.stage_deps(stage))
    c = cfg.checkpoint
    unit = zoo.module(name).CHECKPOINT_UNIT
    every = c.every_steps if unit == "step" else c.every_epochs
    hook = checkpoint.Checkpoints(checkpoint.path_for(stage), key, every, c.min_seconds, unit, write=lead)
    saved, why_not = checkpoint.load(hook.path, key)
    if saved is not None:
        hook.saved_at = saved["loop"]["done"]  # epochs (or steps) already done
    if lead and why_not:
        print(f"{stage}: checkpoint not used: {why_not}; training from scratch", file=sys.stderr)
    elif lead and saved is not None:
        print(f"{stage}: resuming from {hook.path} after {unit} {hook.saved_at}", file=sys.stderr)
    return hook, saved


def read_splits(truth: data.Truth, where: torch.device) -> training.Splits:
    """Train and val splits as tensors on `where` (y as a column), checked against truth.json."""
    arrays = []
    for split in ("train", "val"):
        X, y = data.read_checked_split(paths.split_path(split), truth, split)
        arrays += [torch.from_numpy(X).to(where), torch.from_numpy(y).to(where).unsqueeze(1)]
    return training.Splits(*arrays)


def fit(cfg: config.Config, name: str, splits: training.Splits, group: distributed.Group,
        checkpoints: training.Hook = training.no_checkpoints, resume: dict[str, Any] | None = None,
        progress: bool = True, report: training.Report | None = None) -> tuple[training.TrainResult, models.ModelSpec]:
    """Train model `name` as params.yaml says (data-parallel in a group of several ranks), from the checkpoint's
    state when `resume` holds one, each recorded point given to `report`."""
    # under a search (pipeline/search.py), each epoch's val loss goes to the trial, which may prune it
    pruning = study.epoch_reporter if group.shard[1] == 1 else lambda: None
    loop = training.LoopSettings(seed=cfg.seed, cuda_graph=cfg.cuda_graph, shard=group.shard, progress=progress,
                                 desc=name, checkpoint=checkpoints, resume=resume["loop"] if resume is not None else None,
                                 report=report)
    ctx = zoo.TrainContext(loop, pruning=pruning, wrap=group.wrap, unwrap=group.unwrap)
    return zoo.module(name).train(cfg.model(name), splits, ctx)
