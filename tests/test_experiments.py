"""Sweeps with `dvc exp`: queued experiments run two at a time land in the workspace's store.

One slow end-to-end test (a few minutes on 2 cores): a 4-point grid queued on a
repo whose MLflow store does not exist yet, run with `dvc queue start -j 2`, so
two executors in .dvc/tmp/exps create the store at the same moment.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from pipeline.files import round_sig
from tests.helpers import answers, busy_cpus, clone, dvc, experiments, model_names, run_queue, sh, warm_log

pytestmark = pytest.mark.slow

GRID = ("mlp.lr=0.001,0.1", "mlp.hidden=[4],[6,6]")
MLP_PARAMETERS = {"[4]": 10 * 4 + 4 + 4 + 1, "[6, 6]": 10 * 6 + 6 + 6 * 6 + 6 + 6 + 1}


def _local_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def test_queued_grid_lands_in_workspace_store(project: Path) -> None:
    assert not (project / "mlflow.db").exists()
    baseline = sh(project, "git", "rev-parse", "HEAD").stdout.strip()
    dvc(project, "exp", "run", "--queue", *(a for s in GRID for a in ("-S", s)))
    status = run_queue(project)
    assert "Failed" not in status, status

    # dvc exp show: 4 experiments, each with its params and per-model test metrics.
    exps = experiments(project)
    assert len(exps) == 4, exps.keys()
    grid = {(e["params"]["mlp"]["lr"], tuple(e["params"]["mlp"]["hidden"])) for e in exps.values()}
    assert grid == {(lr, h) for lr in (0.001, 0.1) for h in ((4,), (6, 6))}
    for exp in exps.values():
        scores = exp["metrics"]
        assert all(scores[f"metrics/evaluation/{m}.json"]["test_mse"] > 0 for m in model_names())

    # Every run is in the workspace's store, FINISHED, tagged with its experiment and pipeline.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("regression")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    for name, exp in exps.items():
        mine = [r for r in runs if r.data.tags.get("dvc.exp_name") == name]
        stages = sorted(r.data.tags["stage"] for r in mine)
        # Exactly one run per stage DVC ran; stages restored from the run cache add none.
        ran = sorted(re.findall(r"Running stage '([^']+)'", dvc(project, "queue", "logs", name).stdout))
        assert stages == [s for s in ran if s != "params"], (name, stages, ran)  # the params check opens no run
        assert {"train@mlp", "evaluate"} <= set(stages), (name, stages)
        for run in mine:
            assert run.data.tags["pipeline"] == f"{name}@{baseline[:7]}"
            assert run.data.tags["dvc.baseline_rev"] == baseline
            assert run.data.tags["git.commit"] == baseline
            assert run.info.run_name.endswith(f"[{name}]")

        # The mlp run has the experiment's params, round-tripped from -S through params.yaml.
        (mlp_run,) = [r for r in mine if r.data.tags["stage"] == "train@mlp"]
        hidden = mlp_run.data.params["mlp.hidden"]
        assert hidden == str(list(exp["params"]["mlp"]["hidden"]))
        assert float(mlp_run.data.params["mlp.lr"]) == exp["params"]["mlp"]["lr"]
        assert mlp_run.data.metrics["n_parameters"] == MLP_PARAMETERS[hidden]

        # evaluate scored this experiment's models and copied their test metrics onto the train runs.
        (evaluate,) = [r for r in mine if r.data.tags["stage"] == "evaluate"]
        assert evaluate.data.tags["scored.mlp.run_id"] == mlp_run.info.run_id
        for model in model_names():
            scored = by_id[evaluate.data.tags[f"scored.{model}.run_id"]]
            assert scored.data.metrics["test_mse"] > 0
        test_mse = exp["metrics"]["metrics/evaluation/mlp.json"]["test_mse"]
        assert round_sig(mlp_run.data.metrics["test_mse"]) == test_mse  # MLflow: full precision; the DVC file: rounded

        # Lineage back to the data: train and evaluate name the generate run with their data digest.
        for run in (mlp_run, evaluate):
            generate = by_id[run.data.tags["generate.run_id"]]
            assert generate.data.tags["stage"] == "generate"
            assert generate.data.tags["data.digest"] == run.data.tags["data.digest"]

    # Artifacts live under the workspace's mlartifacts/ and are readable after the temp dirs are gone.
    artifacts = project / "mlartifacts"
    for run in runs:
        root = _local_path(run.info.artifact_uri)
        assert root.is_relative_to(artifacts), run.info.artifact_uri
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files, f"{run.info.run_name}: no artifacts"
        stage = run.data.tags["stage"]
        if stage.startswith("train@"):
            model = stage.removeprefix("train@")
            assert (root / "weights" / f"{model}.safetensors").stat().st_size > 0
            logged = client.search_logged_models(
                [experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
            )
            assert len(logged) == 1
            model_dir = _local_path(logged[0].artifact_location)
            assert model_dir.is_relative_to(artifacts)
            mlmodel = (model_dir / "MLmodel").read_text()
            assert "signature:" in mlmodel and "saved_input_example_info" in mlmodel
        if stage == "evaluate":
            assert json.loads((root / "metrics" / "mlp.json").read_text())["test_mse"] > 0
    assert not list((project / ".dvc" / "tmp" / "exps").glob("tmp*")), "executor temp dirs left behind"

    # params diff / metrics diff between the workspace and an experiment, and between two experiments.
    names = sorted(exps)
    dvc(project, "exp", "apply", names[0])
    params = json.loads(dvc(project, "params", "diff", names[1], "--json").stdout)["params.yaml"]
    changed = {k for k, v in params.items() if v["old"] != v["new"]}
    expected = {k for k in ("mlp.lr", "mlp.hidden") if exps[names[0]]["params"]["mlp"][k[4:]] != exps[names[1]]["params"]["mlp"][k[4:]]}
    assert changed == expected
    metrics = json.loads(dvc(project, "metrics", "diff", names[1], "--json").stdout)
    mlp_mse = metrics["metrics/evaluation/mlp.json"]["test_mse"]
    assert mlp_mse["old"] == pytest.approx(exps[names[1]]["metrics"]["metrics/evaluation/mlp.json"]["test_mse"])
    assert mlp_mse["new"] == pytest.approx(exps[names[0]]["metrics"]["metrics/evaluation/mlp.json"]["test_mse"])


QUEUED_AT_ONCE = 4
ROUNDS_BUSY = (False, True)  # one round as the machine is, then one with every core kept busy
OPENING_S = 2  # after its start, past the moment a stage has the store created or opened (under load)


def _logged(repo: Path, since: int, what: str, count: int) -> Callable[[], bool]:
    """Whether the warm log shows `count` of `what` (a stage or command) run for the queued experiments since line
    `since` (in the workspace, or in their temp workspaces). With warm stages off (no log of their starts): never."""
    pattern = rf" in {re.escape(str(repo))}(/\.dvc/tmp/exps/\S*)?: {re.escape(what)}\b[^\n]* -> run"
    return lambda: len(re.findall(pattern, warm_log()[since:])) >= count


def _opened_the_store(repo: Path, since: int) -> Callable[[], bool]:
    """Whether every queued experiment's evaluate (each one's first stage) has run OPENING_S seconds: the race this
    test is about is over, and the busy processes need not slow the rest of the suite. With warm stages off: never,
    the processes spin to the end."""
    all_started: list[float] = []  # when the log first showed every one
    every = _logged(repo, since, "evaluate", QUEUED_AT_ONCE)

    def opened() -> bool:
        if not all_started and every():
            all_started.append(time.monotonic())
        return bool(all_started) and time.monotonic() - all_started[0] > OPENING_S

    return opened


def test_queued_experiments_started_together_on_a_workspace_without_a_store(baseline: Path, tmp_path: Path) -> None:
    """Issue 28, case 6: four queued experiments started at once (`dvc queue start -j 4`) on a workspace with no
    mlflow.db all succeed: each first stage finds a whole store or waits for the one another is creating, never
    calls it broken. Each round starts from no store; the last with every core busy. Only evaluate.plot_points
    differs (new values each round, so nothing comes from the run cache): evaluate, then the params check, runs in
    each experiment, and four evaluates open the store together, cheaply."""
    from mlflow.tracking import MlflowClient

    for number, busy in enumerate(ROUNDS_BUSY):
        # a fresh copy each round: no store, and a store path this process's MLflow has no engine cached for
        repo = clone(baseline, tmp_path / f"repo{number + 1}")
        assert not (repo / "mlflow.db").exists()
        names = []
        for i in range(QUEUED_AT_ONCE):
            queued = dvc(repo, "exp", "run", "--queue", "-S", f"evaluate.plot_points={100 + 10 * (QUEUED_AT_ONCE * number + i)}")
            names += re.findall(r"Queued experiment '([^']+)'", queued.stdout + queued.stderr)
        assert len(names) == QUEUED_AT_ONCE, names
        before = len(warm_log())
        # busy from the first experiment's start (its DVC process, before its stages; with warm stages off, at once)
        # until the stores are open
        first = (lambda: True) if os.environ.get("PIPELINE_WARM") == "0" else _logged(repo, before, "dvc.cli:main exp exec-run", 1)
        with busy_cpus(after=first, until=_opened_the_store(repo, before)) if busy else nullcontext():
            status = run_queue(repo, jobs=QUEUED_AT_ONCE)
        round_ = f"round {number + 1}{' (busy)' if busy else ''}"
        if os.environ.get("PIPELINE_WARM") != "0":  # the workers ran each experiment's `dvc exp exec-run` warm
            served = answers(warm_log()[before:], "dvc.cli:main exp exec-run", repo)
            assert served == ["run"] * QUEUED_AT_ONCE, f"{round_}: {served} (pipeline/warm.py, queue_env)"
        for name in names:
            line = next((line for line in status.splitlines() if name in line), "")
            log = dvc(repo, "queue", "logs", name).stdout
            assert "Success" in line, f"{round_}: {name}: {line}\n{log[-3000:]}"
            assert "Running stage 'evaluate'" in log and "not an MLflow database" not in log, f"{round_}: {log[-3000:]}"
        assert not list(repo.glob("mlflow.db.*broken*")), round_
        client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("regression").experiment_id], max_results=1000)
        evaluates = sorted(r.data.tags["dvc.exp_name"] for r in runs if r.data.tags["stage"] == "evaluate")
        assert evaluates == sorted(names), f"{round_}: {evaluates}"  # one evaluate run per experiment, in the one store
        assert all(r.info.status == "FINISHED" for r in runs), round_
