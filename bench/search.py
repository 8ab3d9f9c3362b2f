"""A pruned TPE search against a grid over the same space: best validation MSE and training epochs.

Both train in this process through the stage's own training code (stages/train.py `fit`, which
asks pipeline/tracking/study.py's `epoch_reporter` for the trial's pruning hook, as train@mlp
does under `python -m pipeline.search`), on the train/val splits the generate stage draws.
The figure is about the search strategy, so the DVC and MLflow cost of a trial (the same for
both sides) is left out; the pruning is real: the study lives in an Optuna database, each
trial is found by its experiment name, reports every epoch and stops when the pruner says so.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.loops import problem
from bench.report import Row
from bench.workspace import update_params
from pipeline import config, device, search, training
from pipeline.tracking import study as trial_env
from pipeline.tracking.store import environ_kept
from stages import train
from stages.distributed import Group

GRID_POINTS = 3  # values per key: 3 keys give the 27-point grid


def grid_values(rng: config.SearchRange, n: int = GRID_POINTS) -> list[Any]:
    """n values spread over one range: evenly (int, float), geometrically (log), the first n choices."""
    kind, bounds = rng.kind, rng.bounds(rng.kind)
    if kind == "choice":
        return list(bounds[:n])
    lo, hi = bounds
    if kind == "log":
        return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    values = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    return sorted({round(v) for v in values}) if kind == "int" else values


def with_point(cfg: config.Config, point: dict[str, Any]) -> config.Config:
    """The config with a trial's values set, validated as params.yaml would be."""
    return config.parse(update_params(cfg.model_dump(), point))


def train_point(cfg: config.Config, point: dict[str, Any], splits: training.Splits) -> training.TrainResult:
    """train@mlp's training at `point`: seeded as the stage seeds, pruned when a trial's environment is set."""
    c = with_point(cfg, point)
    device.prepare("cpu", c.seed, torch.get_num_threads())
    result, _ = train.fit(c, "mlp", splits, Group(torch.device("cpu")), progress=False)
    return result


@contextmanager
def _trial_environment(url: str, study_name: str, exp_name: str) -> Iterator[None]:
    """The variables `python -m pipeline.search` and DVC give a trial's stage, for the length of one trial."""
    values = {trial_env.STORAGE_ENV: url, trial_env.STUDY_ENV: study_name, "DVC_EXP_NAME": exp_name}
    with environ_kept(*values):
        os.environ.update(values)
        yield


def run_grid(cfg: config.Config, splits: training.Splits) -> tuple[float, int, int, float]:
    """Every point of the grid to the end (early stopping as configured): (best val MSE, epochs, points, seconds)."""
    assert cfg.search is not None
    keys = list(cfg.search.space)
    start, best, epochs, points = time.perf_counter(), math.inf, 0, 0
    for values in itertools.product(*(grid_values(cfg.search.space[k]) for k in keys)):
        result = train_point(cfg, dict(zip(keys, values)), splits)
        best, epochs, points = min(best, min(result.history.val_loss)), epochs + len(result.history.step), points + 1
    return best, epochs, points, time.perf_counter() - start


def run_search(cfg: config.Config, splits: training.Splits, trials: int, folder: Path) -> tuple[float, int, int, float]:
    """The seeded study `python -m pipeline.search` makes (its sampler, params.yaml's pruner):
    (best val MSE of a finished trial, epochs, pruned, seconds)."""
    import optuna
    from optuna.trial import TrialState

    assert cfg.search is not None
    url = f"sqlite:///{folder / 'bench-optuna.db'}"
    name = "bench"
    pruner = cfg.search.pruner.model_dump()
    study = optuna.create_study(study_name=name, storage=trial_env.open_storage(url), direction="minimize",
                                sampler=trial_env.make_sampler(cfg.seed), pruner=trial_env.make_pruner(pruner))
    study.set_user_attr("pruner", pruner)  # what the stage's reporter reads
    start, epochs = time.perf_counter(), 0
    for _ in range(trials):
        trial = study.ask()
        point = search.suggest(trial, cfg.search.space)
        exp_name = f"{name}-t{trial.number}"
        trial.set_user_attr(trial_env.EXP_ATTR, exp_name)
        try:
            with _trial_environment(url, name, exp_name):
                result = train_point(cfg, point, splits)
        except trial_env.TrialPruned:  # stopped at the pruner's word: it trained one epoch per value it reported
            epochs += len(next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number).intermediate_values)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        epochs += len(result.history.step)
        study.tell(trial, min(result.history.val_loss))
    pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    return study.best_value, epochs, pruned, time.perf_counter() - start


def search_rows(params: config.Config, folder: Path, trials: int = 20) -> list[Row]:
    """The two rows: the search's best val MSE against the grid's, and its training epochs against the grid's."""
    if params.search is None:
        return [Row("search vs grid", None, None, "", note="skipped: params.yaml has no search: block")]
    splits = training.Splits(*problem(params, torch.device("cpu")))
    grid_best, grid_epochs, points, grid_s = run_grid(params, splits)
    best, epochs, pruned, search_s = run_search(params, splits, trials, folder)
    space = ", ".join(f"{k} {json.dumps(grid_values(r))}" for k, r in params.search.space.items())
    label = f"{trials} TPE trials, pruned"
    return [
        Row(f"search best val MSE ({label})", best, grid_best, "MSE", f"{points}-point grid", ("<=", 1.0),
            note=f"{best:.5g} vs {grid_best:.5g}; {trials} trials ({pruned} pruned) in {search_s:.0f} s; "
                 f"grid {points} points in {grid_s:.0f} s; "
                 f"{params.data.n_samples:,} rows, up to {params.mlp.epochs} epochs each"),
        Row("  search training epochs", epochs, grid_epochs, "epochs", f"{points}-point grid", ("<=", 0.5),
            note=f"grid: {_short(space)}"),
    ]


def _short(text: str) -> str:
    """Grid values with 3 significant digits."""
    return re.sub(r"\d+\.\d{4,}(e-?\d+)?", lambda m: f"{float(m.group()):.3g}", text)
