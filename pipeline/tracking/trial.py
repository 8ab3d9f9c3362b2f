"""The stage's side of a search: report train@mlp's validation loss per epoch to its Optuna trial, stop when pruned.

`python -m pipeline.search` names each trial's DVC experiment and passes the study
through the environment; DVC sets DVC_EXP_NAME in every stage it runs, so the stage
finds its trial by that name (the same for a workspace run and a queued one).
Outside a search the variables are absent and nothing here runs. Like the rest of
pipeline/tracking/ this is no DVC dependency of a stage: it changes nothing a plain
`dvc repro` produces, and a pruned trial's outputs are recorded by its experiment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

STORAGE_ENV = "PIPELINE_SEARCH_STORAGE"  # the Optuna storage URL of the running study
STUDY_ENV = "PIPELINE_SEARCH_STUDY"      # its name
PARENT_ENV = "PIPELINE_SEARCH_PARENT_RUN"  # the study's MLflow run: the stage runs are shown under it
EXP_ATTR = "dvc.exp_name"                # trial user attribute: the DVC experiment that runs the trial
PRUNED_ATTR = "pruned_at_epoch"          # trial user attribute the stage sets when the pruner stopped it


def open_storage(url: str) -> Any:
    """An Optuna RDB storage; SQLite waits for a busy file instead of failing (a search and its trials share it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def make_pruner(settings: dict[str, Any]) -> Any:
    """The pruner a study's `pruner` user attribute names (params.yaml's search.pruner)."""
    import optuna

    kind = settings["kind"]
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings["startup_trials"], n_warmup_steps=settings["warmup_epochs"])
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings["min_epochs"])
    return optuna.pruners.NopPruner()


def epoch_reporter() -> Callable[[int, float], bool] | None:
    """fit's `on_epoch` for the trial this stage runs, or None outside a search.

    A storage that fails mid-trial costs the pruning, never the stage: the trial trains on.
    """
    url, study_name, exp = (os.environ.get(k) for k in (STORAGE_ENV, STUDY_ENV, "DVC_EXP_NAME"))
    if not (url and study_name and exp):
        return None
    import optuna
    from optuna.trial import TrialState

    try:
        storage = open_storage(url)
        study_id = storage.get_study_id_from_name(study_name)
        found = [t for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                 if t.user_attrs.get(EXP_ATTR) == exp]
        if not found:
            return None
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, found[0].number)
        study = optuna.load_study(study_name=study_name, storage=storage)
        study.pruner = make_pruner(storage.get_study_user_attrs(study_id)["pruner"])
        trial = optuna.trial.Trial(study, trial_id)
    except Exception as exc:  # noqa: BLE001 - any storage failure: train without pruning
        print(f"search: cannot reach trial {exp} of study {study_name!r} ({exc}); training without pruning", file=sys.stderr)
        return None
    working = True

    def report(epoch: int, val_loss: float) -> bool:
        nonlocal working
        if not working:
            return False
        try:
            trial.report(val_loss, epoch)
            if not trial.should_prune():
                return False
            storage.set_trial_user_attr(trial_id, PRUNED_ATTR, epoch)
        except Exception as exc:  # noqa: BLE001
            working = False
            print(f"search: reporting to trial {exp} failed ({exc}); training on without pruning", file=sys.stderr)
            return False
        print(f"search: trial {exp} pruned at epoch {epoch} (val loss {val_loss:.4g}); writing the best weights so far",
              file=sys.stderr)
        return True

    return report
