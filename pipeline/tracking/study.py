"""A search's tracking: one MLflow parent run per study, the trials' stage runs under it; the stage's side of a trial.

The stage's side: the tuned model's train stage reports its validation loss per epoch to its Optuna
trial and, when the pruner says so, fails with TrialPruned (`epoch_reporter`). `python -m pipeline.search`
names each trial's DVC experiment and passes the study through the environment; DVC
sets DVC_EXP_NAME in every stage it runs, so the stage finds its trial by that name.
Outside a search the variables are absent and nothing here runs. Like the rest of
pipeline/tracking/ this is no DVC dependency of a stage: it changes nothing a plain
`dvc repro` produces. A pruned trial's stage fails on purpose: a training cut short is no
result, and DVC records no output of a failed stage, so none reaches its run cache, where the
same params (a later trial, or a `dvc repro`) would otherwise find the cut-short weights.

The parent holds the search space (params), the best value after each finished trial
(metric `best_val_loss`, step = trial number) and the best trial and params (tags).
The stage runs find their parent through provenance.context_tags (`mlflow.parentRunId`,
`search.study`); once a trial is over the search tags them with its number and state.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError, first_line
from pipeline.tracking.run import VIEW_TAG_PREFIX
from pipeline.tracking.store import connect, now_ms, redact, set_experiment_tag

ROLE = ("search.role", "study")


class StudyRun:
    """The study's parent run, by id."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, study: str) -> None:
        self.client, self.run_id, self.experiment_id, self.study = client, run_id, experiment_id, study

    def record_trial(self, number: int, exp_name: str, state: str, value: float | None,
                     best: tuple[int, float, dict[str, Any]] | None) -> int:
        """After a trial: tag its stage runs (trial, state), log the best so far; return how many runs were tagged."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=100,
            filter_string=f"tags.`search.study` = '{self.study}' and tags.`dvc.exp_name` = '{exp_name}'",
        )
        tags = {"search.trial": str(number), "search.state": state}
        if value is not None:
            tags["search.value"] = repr(value)
        for run in runs:
            self.client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if best is not None:
            number_, value_, params = best
            self.client.log_batch(
                self.run_id, metrics=[Metric("best_val_loss", value_, now_ms(), number)],
                tags=[RunTag("best.trial", str(number_)), RunTag("best.value", repr(value_)),
                      RunTag("best.params", json.dumps(params)), RunTag("best.dvc_exp", f"{self.study}-t{number_}")],
            )
        return len(runs)

    def close(self, finished: bool) -> None:
        """End the parent run: FINISHED when the study reached its trials, else KILLED (a resume reopens it)."""
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED if finished else RunStatus.KILLED))


def open_study_run(experiment: str, study: str, space: dict[str, str], storage: str) -> StudyRun:
    """The study's parent run in `experiment`, created the first time, marked RUNNING again on a resume."""
    client, exp_id = connect(experiment)
    found = client.search_runs(
        [exp_id], max_results=1, order_by=["attributes.start_time ASC"],
        filter_string=f"tags.`search.study` = '{study}' and tags.`{ROLE[0]}` = '{ROLE[1]}'",
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    else:
        run = client.create_run(exp_id, run_name=f"search {study}", tags={
            "search.study": study, ROLE[0]: ROLE[1], "search.storage": redact(storage),
        })
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(f"space.{k}", v) for k, v in space.items()])
    save_study_view(client, exp_id, study, list(space))
    return StudyRun(client, run_id, exp_id, study)


def save_study_view(client: MlflowClient, experiment_id: str, study: str, keys: list[str]) -> str:
    """The runs-table view `search-<study>` (`?viewStateShareKey=search-<study>` in the UI): the parent and its
    trials' runs, with trial, state, the searched params and the validation loss; returns its key."""
    columns = ["tags.`search.trial`", "tags.`search.state`", "metrics.`best_val_loss`",
               *(f"params.`{k}`" for k in keys), "tags.`search.value`"]
    state = {"searchFilter": f"tags.`search.study` = '{study}'", "orderByKey": "attributes.start_time",
             "orderByAsc": True, "selectedColumns": columns}
    key = f"search-{study}"
    set_experiment_tag(client, experiment_id, VIEW_TAG_PREFIX + key, json.dumps(state))
    return key


def study_trials(experiment: str, study: str) -> list[dict[str, Any]]:
    """The training runs of a study's trials, as plain rows (for `python -m pipeline.compare --study`)."""
    client, exp_id = connect(experiment)
    runs = client.search_runs(
        [exp_id], max_results=5000,
        filter_string=f"tags.`search.study` = '{study}' and tags.stage LIKE 'train@%'",
    )
    return [
        {"run_id": r.info.run_id, "status": r.info.status, "params": dict(r.data.params),
         "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}
        for r in runs
    ]


STORAGE_ENV = "PIPELINE_SEARCH_STORAGE"  # the Optuna storage URL of the running study
STUDY_ENV = "PIPELINE_SEARCH_STUDY"      # its name
PARENT_ENV = "PIPELINE_SEARCH_PARENT_RUN"  # the study's MLflow run: the stage runs are shown under it
EXP_ATTR = "dvc.exp_name"                # trial user attribute: the DVC experiment that runs the trial
PRUNED_ATTR = "pruned_at_epoch"          # trial user attribute the stage sets when the pruner stopped it


class TrialPruned(PipelineError):
    """The pruner stopped this trial: the stage ends here, writing nothing (Optuna keeps the trial PRUNED)."""


class StorageError(PipelineError):
    """The study's database cannot be used: not a database URL, another backend, or no answer. One line."""


STORAGES = "sqlite:///<path> or postgresql+psycopg://<user>:<password>@<host>:<port>/<database>"
PG_CONNECT_TIMEOUT = 10  # seconds: a PostgreSQL host that does not answer fails in one line, not after TCP's 2 minutes


def open_storage(url: str) -> Any:
    """An Optuna RDB storage; SQLite waits for a busy file instead of failing (a search and its trials share it).

    A URL that is not SQLite or PostgreSQL, a missing folder, a file that is no database or a server that does
    not answer is a StorageError naming the URL (password hidden) and the cause, before the search starts
    anything: Optuna and SQLAlchemy would print 40 to 130 lines of traceback.
    """
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    shown = redact(url)
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"Optuna storage {shown!r} is not a database URL; use {STORAGES}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(f"Optuna storage {shown}: {backend} is not supported; use {STORAGES}")
    if backend == "sqlite" and parsed.database and not Path(parsed.database).parent.is_dir():
        raise StorageError(f"Optuna storage {shown}: folder {Path(parsed.database).parent} does not exist; "
                           "create it or give another path")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = ({"connect_args": {"timeout": 60}} if backend == "sqlite"
              else {"pool_pre_ping": True, "connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT}})
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        cause = first_line(getattr(exc, "orig", None) or exc)
        hint = ("give a new file or an Optuna database" if backend == "sqlite"
                else "check that the server runs, and the host, port, database and credentials")
        raise StorageError(f"Optuna storage {shown} cannot be opened ({cause}); {hint}") from None


def make_sampler(seed: int) -> Any:
    """The study's sampler, the same for `python -m pipeline.search` and the benchmark: TPE, modelling the keys
    jointly (multivariate: a good lr depends on the width and weight decay drawn with it), treating running trials
    as bad (constant liar) so that trials at once do not draw one point, and seeded per trial (from `(seed, k)` for
    trial k) so that two processes of one study draw different points (pipeline/sampler.py)."""
    from pipeline.sampler import TrialSeededTPE

    return TrialSeededTPE(seed)


def make_pruner(settings: dict[str, Any]) -> Any:
    """The pruner a study's `pruner` user attribute names (params.yaml's search.pruner)."""
    import optuna

    kind = settings["kind"]
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings["startup_trials"], n_warmup_steps=settings["warmup_epochs"])
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings["min_epochs"])
    return optuna.pruners.NopPruner()


def epoch_reporter() -> Callable[[int, float], None] | None:
    """fit's `on_epoch` for the trial this stage runs, or None outside a search; it raises TrialPruned to stop.

    Each epoch reports the best validation loss so far: what the trial's objective would be if
    it stopped there, so the pruner compares it with what the finished trials had reached by
    that epoch, not with one noisy epoch of theirs.

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
    working, best = True, float("inf")

    def report(epoch: int, val_loss: float) -> None:
        nonlocal working, best
        best = min(best, val_loss)
        if not working:
            return
        try:
            trial.report(best, epoch)  # the objective (best val loss) if the trial stopped now, not the epoch's noise
            if not trial.should_prune():
                return
            storage.set_trial_user_attr(trial_id, PRUNED_ATTR, epoch)
        except Exception as exc:  # noqa: BLE001
            working = False
            print(f"search: reporting to trial {exp} failed ({exc}); training on without pruning", file=sys.stderr)
            return
        raise TrialPruned(f"search: trial {exp} pruned at epoch {epoch} (best val loss so far {best:.4g}); a training "
                          "cut short is no result: no output written, so DVC caches none (Optuna keeps the trial)")

    return report
