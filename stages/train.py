"""DVC stage `train@<model>`: train one model, write its weights and curves, log to MLflow.

Usage: python -m stages.train {linear_gd,linear,mlp}
"""

from __future__ import annotations

import csv
import sys
from typing import Any

from pipeline import config
from pipeline.errors import PipelineError
from stages import common


def _fit(cfg: config.Config, name: str, tensors: dict[str, Any], progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train model `name` on the tensors; return (TrainResult, architecture spec)."""
    from pipeline import models, training

    X, y, X_val, y_val = tensors["X"], tensors["y"], tensors["X_val"], tensors["y_val"]
    n_features = X.shape[1]
    p = cfg.model(name)
    if name == "linear_gd":
        result = training.train_linear_gd(X, y, X_val, y_val, steps=p.steps, lr=p.lr, progress=progress)
        return result, {"kind": "linear", "n_features": n_features}
    if name == "linear":
        result = training.fit(
            models.linear(n_features), X, y, X_val, y_val, optimizer=p.optimizer, lr=p.lr,
            weight_decay=p.weight_decay, batch_size=p.batch_size, epochs=p.epochs, seed=cfg.seed, progress=progress,
        )
        return result, {"kind": "linear", "n_features": n_features}
    spec = {"kind": "mlp", "n_features": n_features, "hidden": list(p.hidden), "activation": p.activation, "dropout": p.dropout}
    result = training.fit(
        models.build(spec), X, y, X_val, y_val, optimizer=p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
        batch_size=p.batch_size, epochs=p.epochs, seed=cfg.seed, schedule=p.schedule, patience=p.patience,
        progress=progress,
    )
    return result, spec


def _write_loss_csv(name: str, history: Any) -> None:
    from pipeline.files import atomic_path

    with atomic_path(common.loss_plot_path(name)) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "train_loss", "val_loss"])
        writer.writerows(history.rows())


def run(cfg: config.Config, name: str) -> None:
    """Load data, train, write outputs atomically, then log everything to one MLflow run."""
    import torch

    from pipeline import data, files, models, tracking, training

    device = training.resolve_device(cfg.device)
    training.seed_everything(cfg.seed)
    truth = data.read_truth(common.DATA / "truth.json")
    arrays: dict[str, Any] = {}
    for split, key in (("train", ""), ("val", "_val")):
        path = common.split_path(split)
        X, y = data.read_split(path, truth.n_features)
        data.check_consistent(truth, split, X, path)
        arrays[f"X{key}"] = torch.from_numpy(X).to(device)
        arrays[f"y{key}"] = torch.from_numpy(y).to(device).unsqueeze(1)
    digests = {s: files.md5_file(common.split_path(s)) for s in ("train", "val")}
    all_digests = digests | {"test": files.md5_file(common.split_path("test"))}

    stage = f"train@{name}"
    tags = {"device": str(device), "model": name, "data.digest": data.combined_digest(all_digests)}
    with tracking.stage_run(stage, cfg.mlflow.experiment, common.run_name(stage), tags) as run:
        run.log_params(config.stage_params(cfg, stage))
        tracking.link_generate_run(run, tags["data.digest"])
        for split in ("train", "val"):
            run.log_dataset(common.split_path(split), split, digests[split], split, truth.rows[split])
        try:
            result, spec = _fit(cfg, name, arrays)
        except training.Diverged as exc:
            run.log_curve("train_loss", exc.history.step, exc.history.train_loss)
            run.log_curve("val_loss", exc.history.step, exc.history.val_loss)
            lr = cfg.model(name).lr
            raise PipelineError(
                f"training diverged: the loss became {exc.loss} at step {exc.step}; "
                f"try a smaller {name}.lr (now {lr:g}, e.g. {lr / 10:g}). No model was written."
            ) from None

        models.save_weights(result.model, spec, common.weights_path(name))
        _write_loss_csv(name, result.history)
        summary = {
            "final_train_loss": result.history.train_loss[-1],
            "best_val_loss": min(result.history.val_loss),
            "best_step": result.best_step,
            "steps_run": result.history.step[-1] + 1,
            "stopped_early": int(result.stopped_early),
            "train_seconds": result.seconds,
            "n_parameters": models.count_parameters(result.model),
            **result.extra,
        }
        files.write_json(common.METRICS / "train" / f"{name}.json", summary)

        if result.step_losses:
            run.log_curve("train_loss", range(len(result.step_losses)), result.step_losses)
        else:
            run.log_curve("train_loss", result.history.step, result.history.train_loss)
        run.log_curve("val_loss", result.history.step, result.history.val_loss)
        run.log_metrics(summary)
        run.log_artifact(common.weights_path(name), "weights")
        example = arrays["X_val"][:5].cpu().numpy()
        run.log_torch_model(result.model, example, [f"torch=={torch.__version__.split('+')[0]}"])
        run.set_tags({"model.digest": files.md5_file(common.weights_path(name)), "n_parameters": summary["n_parameters"]})


def _main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in config.MODEL_NAMES:
        print(f"usage: python -m stages.train {{{','.join(config.MODEL_NAMES)}}}", file=sys.stderr)
        sys.exit(2)
    name = sys.argv[1]
    common.main(f"train@{name}", lambda cfg: run(cfg, name))


if __name__ == "__main__":
    _main()
