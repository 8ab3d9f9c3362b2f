"""`python -m pipeline.search`: an Optuna study whose trials are DVC experiments and MLflow runs.

The bad-input cases run in-process or stop before any trial (seconds). The slow tests run
real searches on tiny data: one with --jobs 2 through the DVC queue (a few minutes on 2
cores), one killed with SIGKILL in the middle of a trial and resumed, two processes sharing
one study on a throwaway PostgreSQL, and a restart that clears a killed search's DVC queue.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config
from tests.helpers import (
    PG_PASSWORD, PG_USER, answers, clone_with_params, copy_project, dvc, experiments, free_port, pg_bin, run_checked, run_env, set_params, sh,
    tiny_params, trial_runs_against_experiments, warm_log,
)

# An aggressive pruner and a space with a hopeless learning rate, so a seeded search prunes for sure:
# the median of one finished trial decides from the first epoch on.
SEARCH = {
    "space": {"mlp.lr": {"choice": [0.03, 0.00001]}, "mlp.hidden": {"choice": [[4], [8]]}},
    "pruner": {"kind": "median", "startup_trials": 1, "warmup_epochs": 0},
}
TRIAL_PARAMS = {"mlp.epochs": 4, "mlp.patience": 4, "search": SEARCH}


def _search(repo: Path, *args: str, check: bool = True, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return sh(repo, sys.executable, "-m", "pipeline.search", *args, check=check, timeout=timeout)


def _trials(repo: Path, study: str) -> list[Any]:
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{repo / 'optuna.db'}").get_trials()


# (edit of the search block, fragments of the one line it must give)
BAD_SPACES: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({"mlp.lrr": {"log": [0.001, 0.1]}}, ("search.space.mlp.lrr", "unknown key", "did you mean 'mlp.lr'")),
    ({"data.n_samples": {"int": [10, 20]}}, ("search.space.data.n_samples", "not a key of a model's block")),
    ({"mlp.lr": {"log": [0.1, 0.001]}}, ("search.space.mlp.lr.log: got [0.1, 0.001]", "empty or inverted range")),
    ({"mlp.epochs": {"int": [5, 5]}}, ("search.space.mlp.epochs.int: got [5, 5]", "empty or inverted range")),
    ({"mlp.lr": {"log": [0, 0.1]}}, ("search.space.mlp.lr.log", "above 0")),
    ({"mlp.hidden": {"choice": [[32], "wide"]}}, ("search.space.mlp.hidden: got 'wide'", "not a valid mlp.hidden")),
    ({"mlp.activation": {"choice": ["relu", 3]}}, ("search.space.mlp.activation: got 3", "'relu', 'gelu'")),
    ({"mlp.epochs": {"float": [2, 5]}}, ("search.space.mlp.epochs: got 2.0", "valid integer")),
    ({"mlp.dropout": {"float": [0, 1.5]}}, ("search.space.mlp.dropout: got 1.5", "less than 1")),
    ({"mlp.lr": {"lg": [0.1, 1]}}, ("search.space.mlp.lr: got lg", "did you mean 'log'")),
    ({"mlp.lr": {"log": [0.001, 0.1], "int": [1, 2]}}, ("search.space.mlp.lr", "exactly one of int, float, log, choice")),
    ({"mlp.lr": {"choice": []}}, ("search.space.mlp.lr.choice", "at least 1")),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("space", "expected"), BAD_SPACES)
def test_bad_search_space_is_one_line(space: dict[str, Any], expected: tuple[str, ...]) -> None:
    raw = tiny_params() | {"search": {"space": space}}
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in expected:
        assert fragment in message, message


def test_committed_space_is_valid(defaults_file: Path) -> None:
    cfg = config.load(defaults_file)
    assert cfg.search is not None and {"mlp.lr", "mlp.hidden", "mlp.weight_decay"} <= set(cfg.search.space)


def test_a_trial_reports_its_best_val_loss_so_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pruner judges the objective (the best val loss if the trial stopped now), not one noisy epoch."""
    import optuna

    from pipeline.tracking import study as trial_env

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="r", storage=url)
    study.set_user_attr("pruner", {"kind": "none", "startup_trials": 0, "warmup_epochs": 0, "min_epochs": 1})
    trial = study.ask()
    trial.set_user_attr(trial_env.EXP_ATTR, "r-t0")
    for key, value in ((trial_env.STORAGE_ENV, url), (trial_env.STUDY_ENV, "r"), ("DVC_EXP_NAME", "r-t0")):
        monkeypatch.setenv(key, value)
    report = trial_env.epoch_reporter()
    assert report is not None
    for epoch, loss in enumerate([3.0, 2.0, 2.5, 1.5, 4.0]):
        report(epoch, loss)  # a pruner that never prunes: no TrialPruned
    assert study.trials[0].intermediate_values == {0: 3.0, 1: 2.0, 2: 2.0, 3: 1.5, 4: 1.5}


def test_a_batch_is_looked_up_soon_after_a_change_and_less_often_while_nothing_changes() -> None:
    from pipeline.search import POLL_MAX_S, POLL_S, poll_delay

    delays, delay = [], POLL_S
    for changed in (True, False, False, False, False, False, True, False):
        delay = poll_delay(delay, changed)
        delays.append(delay)
    assert delays == [POLL_S, 3.0, 4.5, 6.75, POLL_MAX_S, POLL_MAX_S, POLL_S, 3.0]


@pytest.mark.bad_input
def test_bad_options_and_a_changed_space_are_one_line_before_any_trial(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo", {"search": SEARCH})
    for args, fragment in (
        (["--trials", "0"], "--trials must be at least 1, got 0"),
        (["--jobs", "0"], "--jobs must be between 1 and"),
        (["--study", "a b"], "--study 'a b': a name of letters"),
        (["--timeout", "-1"], "--timeout must be a number of seconds above 0"),
    ):
        proc = _search(repo, *args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr

    import optuna

    study = optuna.create_study(study_name="old", storage=f"sqlite:///{repo / 'optuna.db'}")
    study.set_user_attr("space", {"mlp.lr": "log [0.001, 0.1]"})
    proc = _search(repo, "--study", "old", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "study 'old' exists with another space (mlp.lr: log [0.001, 0.1]" in proc.stderr
    assert not (repo / "mlflow.db").exists(), "nothing ran before the line"
    assert experiments(repo) == {}


@pytest.mark.bad_input
def test_too_many_jobs_and_a_bad_storage_are_one_line_before_any_work(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    repo = copy_project(tmp_path / "repo", {"search": SEARCH})
    cores, port = len(os.sched_getaffinity(0)), free_port()  # nothing listens on that port
    cases = (
        (["--jobs", str(cores + 1)], 2, f"--jobs must be between 1 and {cores} (the cores this process may use), got {cores + 1}"),
        (["--storage", "not-a-url"], 1, "Optuna storage 'not-a-url' is not a database URL; use sqlite:///<path> or postgresql"),
        (["--storage", "mysql://u@127.0.0.1/optuna"], 1, "mysql is not supported; use sqlite:///<path> or postgresql"),
        (["--storage", f"sqlite:///{tmp_path / 'absent' / 'o.db'}"], 1, f"folder {tmp_path / 'absent'} does not exist"),
        (["--storage", f"sqlite:///{repo / 'params.yaml'}"], 1, "cannot be opened (file is not a database); give a new file"),
        (["--storage", f"postgresql+psycopg://u:pw-never-shown@127.0.0.1:{port}/optuna"], 1,
         f"postgresql+psycopg://***@127.0.0.1:{port}/optuna cannot be opened (connection failed: connection to server "
         f'at "127.0.0.1", port {port} failed: Connection refused); check that the server runs'),
    )
    for args, code, fragment in cases:
        proc = _search(repo, *args, check=False)
        assert proc.returncode == code and proc.stderr.count("\n") == 1 and fragment in proc.stderr, (args, proc.stderr)
        assert proc.stderr.startswith("search: ") and "pw-never-shown" not in proc.stdout + proc.stderr
    assert not (repo / "mlflow.db").exists() and not (repo / "optuna.db").exists(), "nothing ran before the line"
    assert experiments(repo) == {}
    request.node.user_properties.append(("bad_input_cases", len(cases)))


@pytest.mark.slow
def test_search_two_at_a_time_end_to_end(baseline: Path, tmp_path: Path) -> None:
    repo = clone_with_params(baseline, tmp_path / "repo", TRIAL_PARAMS)
    before = len(warm_log())
    proc = _search(repo, "--trials", "4", "--jobs", "2", "--study", "t")
    out = proc.stdout
    if os.environ.get("PIPELINE_WARM") != "0":  # the search itself ran in a warm server's child, as a stage does
        assert answers(warm_log()[before:], "pipeline.search", repo) == ["run"], warm_log()[before:]
        # ... and its trials' DVC processes too (warm.queue_env, from the search's child)
        assert answers(warm_log()[before:], "dvc.cli:main exp exec-run", repo) == ["run"] * 4, warm_log()[before:]
    for k in range(4):
        assert f"trial {k} [t-t{k}]" in out, out

    # Optuna: every trial finished, none RUNNING, at least one pruned; the best is named with its restore command.
    trials = {t.number: t for t in _trials(repo, "t")}
    states = {n: t.state.name for n, t in trials.items()}
    assert sorted(trials) == [0, 1, 2, 3] and set(states.values()) <= {"COMPLETE", "PRUNED"}, states
    assert "PRUNED" in states.values(), states
    best = min((t for t in trials.values() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert f"restore it: dvc exp apply t-t{best.number}" in out

    # DVC: every finished trial is an experiment with its params; the objective is its validation loss, never a
    # test metric. A pruned trial's stage failed on purpose (a training cut short is no result): no experiment,
    # its value the best validation loss it reported.
    exps = experiments(repo)
    complete = {k for k, t in trials.items() if t.state.name == "COMPLETE"}
    assert set(exps) == {f"t-t{k}" for k in complete}, exps.keys()
    for k, trial in trials.items():
        if k not in complete:
            assert trial.value == trial.user_attrs["best_val_loss"] == min(trial.intermediate_values.values())
            continue
        exp = exps[f"t-t{k}"]
        assert exp["params"]["mlp"]["lr"] == json.loads(trial.params["mlp.lr"])  # choices go through Optuna as JSON
        assert exp["params"]["mlp"]["hidden"] == json.loads(trial.params["mlp.hidden"])
        assert exp["metrics"]["metrics/train/mlp.json"]["best_val_loss"] == trial.value

    # `dvc exp apply` of the best restores its outputs; training again from them gives the same metrics file.
    name = f"t-t{best.number}"
    dvc(repo, "exp", "apply", name)
    applied = (repo / "metrics/train/mlp.json").read_text()
    assert json.loads(applied) == exps[name]["metrics"]["metrics/train/mlp.json"]
    assert "up to date" in dvc(repo, "status").stdout
    dvc(repo, "repro", "--force", "--single-item", "train@mlp")
    assert (repo / "metrics/train/mlp.json").read_text() == applied

    # The search block is no param of a computing stage: editing it reruns only the `params` check (no outputs).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["search"]["space"]["mlp.lr"] = {"log": [0.001, 0.1]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(dvc(repo, "status", "--json").stdout)) == {"params"}

    # MLflow: one parent for the study, each trial's two stage runs under it, tagged with trial and state.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("regression").experiment_id
    (parent,) = client.search_runs([exp_id], filter_string="tags.`search.role` = 'study'")
    assert parent.data.tags["search.study"] == "t" and parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.params["space.mlp.lr"] == "choice [0.03, 1e-05]"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "best_val_loss")] == [0, 1, 2, 3]
    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    staged = {k: {r.data.tags["stage"]: r for r in children if r.data.tags.get("search.trial") == str(k)} for k in trials}
    for k, trial in trials.items():
        mine = staged[k]
        twins = [n for n, t in trials.items() if t.params == trial.params and n != k]  # a point drawn again
        if not mine:  # (4 in this space): DVC restored its stages from the run cache, none ran
            assert any(n < k for n in twins), (k, trial.params)
            continue
        # the first trials also run the rest; a pruned trial's stage failed, so its evaluate never ran; two trials of
        # one point at once both train, and the second evaluate finds the first one's in DVC's run cache
        assert "train@mlp" in mine, (k, mine.keys())
        if k in complete:
            assert "evaluate" in mine or any("evaluate" in staged[n] for n in twins), (k, mine.keys())
        assert mine["train@mlp"].data.tags["search.state"] == trial.state.name.lower()
        assert mine["train@mlp"].info.status == ("FINISHED" if k in complete else "FAILED")
    assert not client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'")
    view = json.loads(client.get_experiment(exp_id).tags["mlflow.sharedViewState.search-t"])  # the UI's study view
    assert view["searchFilter"] == "tags.`search.study` = 't'" and "params.`mlp.lr`" in view["selectedColumns"], view

    table = sh(repo, sys.executable, "-m", "pipeline.compare", "--study", "t").stdout.splitlines()
    assert table[1].split()[:2] == [str(best.number), "complete"], table

    # No pruned training reached DVC's run cache: a pruned point no finished trial shares trains again in full.
    finished = [trials[k].params for k in complete]
    again = next((t for t in trials.values() if t.state.name == "PRUNED" and t.params not in finished), None)
    if again is not None:
        set_params(repo, {k: json.loads(v) for k, v in again.params.items()})
        assert "Running stage 'train@mlp'" in dvc(repo, "repro", "train@mlp").stdout


@pytest.mark.slow
def test_killed_search_resumes(baseline: Path, tmp_path: Path) -> None:
    # seed 2: trials 0, 1 and 2 draw three different points (a point drawn again comes from DVC's run cache, and
    # trial 1 must train to be killed while it does)
    repo = clone_with_params(baseline, tmp_path / "repo", {**TRIAL_PARAMS, "seed": 2})
    cmd = [sys.executable, "-m", "pipeline.search", "--trials", "2", "--study", "k"]
    proc = subprocess.Popen(cmd, cwd=repo, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        seen = ""
        while "trial 0 [k-t0]" not in seen:
            line = proc.stdout.readline()
            assert line, f"the search ended before its first trial:\n{seen}"
            seen += line
        # kill once trial 1's train@mlp has reported an epoch: its `dvc exp run` is under way (evaluate still to come)
        deadline = time.monotonic() + 300
        while not any(t.number == 1 and t.intermediate_values for t in _trials(repo, "k")):
            assert proc.poll() is None and time.monotonic() < deadline, "trial 1 never reported an epoch"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the search, dvc and the stage: nothing cleans up
        proc.communicate()
    before = {t.number: t for t in _trials(repo, "k")}
    assert before[1].state.name == "RUNNING" and before[0].state.name in ("COMPLETE", "PRUNED"), before

    again = _search(repo, "--trials", "2", "--study", "k")
    assert "1 trial(s) left RUNNING by a killed search marked FAILED" in again.stdout, again.stdout
    after = {t.number: t for t in _trials(repo, "k")}
    assert after[0].state == before[0].state and after[0].values == before[0].values, "the finished trial is kept"
    assert after[1].state.name == "FAIL"
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after.values()) == 2 and len(after) == 3
    assert not [t for t in after.values() if t.state.name == "RUNNING"]
    # trial k is drawn from (seed, k): the resumed search does not draw trial 0's point again
    assert after[2].params != after[0].params


@pytest.mark.slow
def test_two_searches_share_one_postgres_study(postgres: str, start_server: Any, baseline: Path, tmp_path: Path) -> None:
    """Two machines of a team: two workspaces, one Optuna study and one MLflow server on PostgreSQL."""
    host_port = postgres.rsplit("@", 1)[1].split("/", 1)[0]
    # a database of its own: Optuna and MLflow would both keep an alembic_version table in one
    run_checked([str(pg_bin() / "createdb"), "-h", "127.0.0.1", "-p", host_port.split(":")[1], "-U", PG_USER, "optuna"],
         PGPASSWORD=PG_PASSWORD)
    storage = f"postgresql+psycopg://{PG_USER}:{PG_PASSWORD}@{host_port}/optuna"
    server = start_server(BACKEND_STORE_URI=postgres)
    env = run_env(MLFLOW_TRACKING_URI=server.url, OPTUNA_STORAGE=storage)
    repos = [clone_with_params(baseline, tmp_path / f"machine{i}", TRIAL_PARAMS) for i in (1, 2)]
    cmd = [sys.executable, "-m", "pipeline.search", "--trials", "4", "--study", "team"]
    first = subprocess.Popen(cmd, cwd=repos[0], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        opening = first.stdout.readline()  # the study and its MLflow parent exist: the second joins them
        assert "search: study 'team' in postgresql+psycopg://***@" in opening, opening + first.stderr.read()
        second = sh(repos[1], *cmd, env=env, timeout=1200)
        out, err = first.communicate(timeout=1200)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, out + err

    import optuna

    trials = optuna.load_study(study_name="team", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and sum(s in ("COMPLETE", "PRUNED") for s in states) >= 4, states
    # every trial ran once, on one machine, as that machine's DVC experiment
    ran = [{int(k) for k in re.findall(r"^trial (\d+) \[team-t\d+\]", text, re.M)} for text in (out, second.stdout)]
    assert ran[0] and ran[1] and not ran[0] & ran[1], ran
    assert ran[0] | ran[1] == {t.number for t in trials}, (ran, states)
    finished = {t.number for t in trials if t.state.name == "COMPLETE"}  # a pruned trial's stage failed: no experiment
    for repo, mine in zip(repos, ran):
        assert set(experiments(repo)) == {f"team-t{k}" for k in mine & finished}
    assert {t.number: t.user_attrs["pid"] for t in trials}.keys() == ran[0] | ran[1]
    assert len({t.user_attrs["pid"] for t in trials}) == 2

    # one parent run on the server for the study; the best-so-far history has one point per finished trial
    exp = server.api("experiments/get-by-name", experiment_name="regression")["experiment"]
    runs = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("search.role") == "study"]
    assert len(parents) == 1, [t.get("mlflow.runName") for t in tags]
    parent_id = parents[0]["info"]["run_id"]
    trained = {t["search.trial"] for t in tags if t.get("stage") == "train@mlp" and t.get("mlflow.parentRunId") == parent_id}
    assert trained <= {str(k) for k in ran[0] | ran[1]} and trained, trained


@pytest.mark.slow
def test_restart_removes_the_studys_stale_queued_trials(tmp_path: Path) -> None:
    """A killed search can leave entries queued: the next start drops those whose trial is over, only those; entries
    of others refuse it in one line (their workers would run its trials), and once they are gone it starts."""
    import optuna

    repo = copy_project(tmp_path / "repo", {"search": SEARCH})
    from pipeline.search import describe_space, experiments_state

    study = optuna.create_study(study_name="q", storage=f"sqlite:///{repo / 'optuna.db'}")
    study.set_user_attr("space", describe_space(config.parse(tiny_params() | {"search": SEARCH}).search.space))
    study.set_user_attr("pruner", SEARCH["pruner"])
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # q-t0: marked FAILED, its entry still queued
    elsewhere = study.ask()                                        # q-t1: running on another machine
    elsewhere.set_user_attr("host", "another-host")
    for name in ("q-t0", "q-t1", "other"):
        dvc(repo, "exp", "run", "--queue", "-S", "mlp.lr=0.01", "--name", name)

    proc = _search(repo, "--study", "q", "--trials", "1", "--timeout", "1e-9", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "search: the DVC queue of this workspace is busy (other, q-t1): its workers would run" in proc.stderr
    assert {n for n, (state, _) in experiments_state(repo).items() if state == "queued"} == {"q-t1", "other"}

    dvc(repo, "queue", "remove", "q-t1", "other")
    proc = _search(repo, "--study", "q", "--trials", "1", "--timeout", "1e-9")
    assert "--timeout 1e-09 s reached" in proc.stdout, proc.stdout


def test_state_survives_an_experiments_run_file_vanishing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An experiment being cleaned up leaves its run folder under .dvc/tmp/exps/run/ a moment after its run file, and a
    `dvc exp show` in that moment fails: the search looks again rather than ending (it did, in a killed search's
    resume). A run folder without its file is that moment, held; it goes a few seconds later."""
    import threading

    from pipeline import search
    from pipeline.search import SearchError, experiments_state, vanished_under_exps

    repo = copy_project(tmp_path / "repo")
    folder = repo / ".dvc" / "tmp" / "exps" / "standalone" / "run" / "0123abcd"  # `dvc exp run --temp`'s
    folder.mkdir(parents=True)
    held = dvc(repo, "exp", "show", "--json", check=False)
    assert held.returncode != 0 and vanished_under_exps(held.stderr), held.stderr  # DVC still fails in that moment
    with monkeypatch.context() as short:
        short.setattr(search, "VANISHED_WAIT_S", 1.5)
        with pytest.raises(SearchError, match=r"dvc exp show failed: .*No such file or directory: .*0123abcd\.run"):
            experiments_state(repo)  # a folder that stays: the search says why, after its looks
    timer = threading.Timer(3.0, folder.rmdir)
    timer.start()
    try:
        assert experiments_state(repo) == {}
    finally:
        timer.join()
    assert not vanished_under_exps("ERROR: unexpected error - [Errno 2] No such file or directory: '/w/params.yaml'")
    # a trial's temp workspace being set up as the search looks (DVC's line, seen while a batch's trials started)
    assert vanished_under_exps("ERROR: failed to show experiments - directory '/w/.dvc/tmp/exps/tmpwb45kb93/.dvc' does "
                               "not exist")
    assert not vanished_under_exps("ERROR: failed to show experiments - directory '/w/.dvc' does not exist")
    # a trial's run file read as DVC writes it (DVC's line, seen in CI as two searches looked up their batches)
    assert vanished_under_exps("ERROR: failed to show experiments - unable to read: '.dvc/tmp/exps/run/c525e520/c525e5"
                               "20.run', JSON file structure is corrupted: Expecting value: line 1 column 1 (char 0)")
    assert not vanished_under_exps("ERROR: unable to read: 'dvc.lock', YAML file structure is corrupted")
    # a look that hung (killed past SHOW_TIMEOUT_S, as one reading a vanishing temp workspace did in CI) is asked again
    real, calls = search._dvc, []

    def hangs_once(root: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(kwargs.get("timeout"))
        if len(calls) == 1:
            return subprocess.CompletedProcess(args, -signal.SIGKILL, "", "ERROR: `dvc exp show --json` hung")
        return real(root, *args, **kwargs)

    monkeypatch.setattr(search, "_dvc", hangs_once)
    assert experiments_state(repo) == {} and calls == [search.SHOW_TIMEOUT_S] * 2


def test_on_epoch_hears_every_epoch_and_what_it_raises_stops_fit() -> None:
    import torch

    from pipeline import models, training

    gen = torch.Generator().manual_seed(0)
    X, X_val = torch.randn(200, 3, generator=gen), torch.randn(50, 3, generator=gen)
    y, y_val = X.sum(1, keepdim=True), X_val.sum(1, keepdim=True)
    spec = models.ModelSpec("mlp", 3, (4,), "relu", 0.0)
    splits = training.Splits(X, y, X_val, y_val)
    kwargs = dict(optimizer="adam", lr=0.01, weight_decay=0.0, batch_size=32, epochs=6, seed=0, patience=6, progress=False)
    torch.manual_seed(0)
    full = training.fit(models.build(spec), splits, training.FitSettings(**kwargs))
    torch.manual_seed(0)
    seen: list[tuple[int, float]] = []
    never = training.fit(models.build(spec), splits, training.FitSettings(
        **kwargs, on_epoch=lambda e, v: seen.append((e, v))))
    assert never.history == full.history and not never.stopped_early  # a hook that only listens changes nothing
    assert seen == list(zip(full.history.step, full.history.val_loss))
    from pipeline.tracking import study as trial_env

    def prune_at_2(epoch: int, val_loss: float) -> None:
        seen.append((epoch, val_loss))
        if epoch == 2:
            raise trial_env.TrialPruned("pruned")

    seen.clear()
    torch.manual_seed(0)
    with pytest.raises(trial_env.TrialPruned):  # the stage fails with it: nothing is written for DVC to cache
        training.fit(models.build(spec), splits, training.FitSettings(**kwargs, on_epoch=prune_at_2))
    assert seen == list(zip(full.history.step, full.history.val_loss))[:3]


# A failing stage's log as `dvc queue logs` gives it (the stage's own line, then DVC's), and DVC's own failure.
QUEUE_LOG = """Reproducing experiment 'w-t0'
WARNING: No file hash info found for '/tmp/x/.dvc/tmp/exps/tmp5_1fg83t/models/mlp.safetensors'. It won't be created.
Stage 'generate' is cached - skipping run, checking out outputs
Running stage 'train@mlp':
> python -m stages train mlp
train@mlp: training diverged: the loss became inf at step 1; try a smaller mlp.lr (now 1e+30, e.g. 1e+29). No model was written.
ERROR: failed to reproduce 'train@mlp': failed to run: python -m stages train mlp, exited with 1
ERROR: failed to reproduce 'train@mlp': failed to run: python -m stages train mlp, exited with 1
"""


def test_a_failed_trials_line_is_its_real_error() -> None:
    from pipeline.search import error_line

    assert error_line(QUEUE_LOG).startswith("train@mlp: training diverged: the loss became inf at step 1")
    traceback = QUEUE_LOG.replace("train@mlp: training diverged", "ZeroDivisionError: boom")
    assert error_line(traceback) == "failed to reproduce 'train@mlp': failed to run: python -m stages train mlp, exited with 1"
    locked = "Reproducing experiment 'w-t7'\nERROR: Unable to acquire lock. Most likely another DVC process is running\n"
    assert error_line(locked).startswith("Unable to acquire lock")
    assert error_line("Reproducing experiment 'w-t7'\n\n") == "Reproducing experiment 'w-t7'"  # no error: the last line


def test_processes_of_one_study_draw_different_points(tmp_path: Path) -> None:
    """Two processes of one study (one storage, each its own sampler from the same seed) draw apart, reproducibly."""
    import optuna

    from pipeline.tracking.study import make_sampler

    def draws(url: str) -> list[tuple[int, float]]:
        studies = [optuna.load_study(study_name="s", storage=url, sampler=make_sampler(42)) for _ in range(2)]
        out = []
        for k in range(12):  # interleaved as two searches ask: past the random start-up trials into TPE's own
            study = studies[k % 2]
            trial = study.ask()
            x = trial.suggest_float("x", 1e-4, 1.0, log=True)
            study.tell(trial, (x - 0.01) ** 2)
            out.append((trial.number, x))
        return out

    urls = [f"sqlite:///{tmp_path / f'{i}.db'}" for i in (1, 2)]
    for url in urls:
        optuna.create_study(study_name="s", storage=url)
    first, again = draws(urls[0]), draws(urls[1])
    assert len({x for _, x in first}) == len(first), first
    assert first == again, "seeded: the same study from scratch draws the same points"


@pytest.mark.slow
def test_two_searches_in_one_workspace(baseline: Path, tmp_path: Path) -> None:
    """A second search on a busy workspace is refused before it starts; a clone joins the same study and draws its own
    points; every MLflow run's params are those its weights were trained with, and DVC's run cache agrees."""
    search = {"space": {"mlp.lr": {"log": [0.001, 0.03]}, "mlp.hidden": {"choice": [[4], [8]]}},
              "pruner": {"kind": "none"}}
    repos = [clone_with_params(baseline, tmp_path / f"clone{i}", {**TRIAL_PARAMS, "search": search}) for i in (1, 2)]
    storage = f"sqlite:///{repos[0] / 'optuna.db'}"
    cmd = [sys.executable, "-m", "pipeline.search", "--trials", "4", "--study", "w", "--storage", storage]
    first = subprocess.Popen(cmd, cwd=repos[0], env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        opening = first.stdout.readline()
        assert "search: study 'w'" in opening, opening + first.stderr.read()
        second = _search(repos[0], "--trials", "4", "--study", "w", "--storage", storage, check=False)
        assert second.returncode == 1 and second.stdout == "" and second.stderr.count("\n") == 1, second
        assert f"search of study 'w' (pid {first.pid}) is running in this workspace" in second.stderr, second.stderr
        other = sh(repos[1], *cmd, timeout=1500)  # the clone: the same study, through its storage
        out, err = first.communicate(timeout=1500)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, out + err

    import optuna

    trials = {t.number: t for t in optuna.load_study(study_name="w", storage=storage).get_trials()}
    assert sorted(t.state.name for t in trials.values()) == ["COMPLETE"] * 4, trials
    ran = [{int(k) for k in re.findall(r"^trial (\d+) \[w-t\d+\]", text, re.M)} for text in (out + opening, other.stdout)]
    assert ran[0] and ran[1] and not ran[0] & ran[1], ran
    assert len({t.params["mlp.lr"] for t in trials.values()}) == 4, "the two processes drew apart"

    for repo, mine in zip(repos, ran):
        checked = trial_runs_against_experiments(repo, "w")
        assert set(checked) == {f"w-t{k}" for k in mine}, checked.keys()
        for name, (logged, recorded, weights) in checked.items():
            trial = trials[int(name.rsplit("-t", 1)[1])]
            assert logged == recorded and weights == "same", (name, logged, recorded, weights)
            assert float(logged["mlp.lr"]) == trial.params["mlp.lr"], (name, logged, trial.params)
    # DVC's run cache: a trial's params, run again by hand, give back that trial's weights without training
    best = min(trials.values(), key=lambda t: t.value)
    repo = repos[0] if best.number in ran[0] else repos[1]
    point = {"mlp.lr": best.params["mlp.lr"], "mlp.hidden": json.loads(best.params["mlp.hidden"])}
    set_params(repo, point)
    assert "Stage 'train@mlp' is cached" in dvc(repo, "repro", "train@mlp").stdout  # (generate's data, cached too)
    from pipeline.files import md5_file

    name = f"w-t{best.number}"
    assert trial_runs_against_experiments(repo, "w")[name][2] == "same"
    lock = yaml.safe_load(sh(repo, "git", "show", f"{experiments(repo)[name]['rev']}:dvc.lock").stdout)
    assert md5_file(repo / "models/mlp.safetensors") == next(
        o["md5"] for o in lock["stages"]["train@mlp"]["outs"] if o["path"].endswith(".safetensors"))
    assert "search.lock" not in sh(repo, "git", "status", "--porcelain").stdout


@pytest.mark.slow
def test_a_failed_trial_says_the_stages_error(baseline: Path, tmp_path: Path) -> None:
    repo = clone_with_params(baseline, tmp_path / "repo", {**TRIAL_PARAMS, "search": {"space": {"mlp.lr": {"choice": [1.0e30]}}}})
    before = len(warm_log())
    proc = _search(repo, "--trials", "1", "--study", "f", check=False)
    if os.environ.get("PIPELINE_WARM") != "0":
        # each batch's workers are told to stop once its trials are over: left alone, a worker idles up to 10 s before
        # it quits, and the next batch would wait for it (the first stop: the idle workers of the workspace)
        said = re.findall(rf" in {re.escape(str(repo))}: dvc\.cli:main (queue stop|--wait-for-lock exp run --queue)",
                          warm_log()[before:])
        assert said == ["queue stop"] + ["--wait-for-lock exp run --queue", "queue stop"] * 3, said
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("trial ")]
    assert proc.returncode == 1 and len(lines) == 3, proc.stdout + proc.stderr
    for line in lines:
        assert " fail " in line and "train@mlp: training diverged: the loss became" in line, line
    assert proc.stderr.startswith("search: 3 trials failed in a row; the last: train@mlp: training diverged"), proc.stderr
