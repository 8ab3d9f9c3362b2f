"""The champion under concurrency: many evaluates register and elect at once on one real `mlflow server`.

Each worker is its own OS process (the registry code has no shared memory to lean on),
runs the real `tracking.stage_run` + `StageRun.register_model` path, and releases from a
barrier together with the others, round after round.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server, mlflow_server

EXPERIMENT = "registry-race"
DIGEST = "f" * 32
WORKERS = int(os.environ.get("RACE_WORKERS", 8))
ROUNDS = int(os.environ.get("RACE_ROUNDS", 6))
CLAIM = re.compile(r"^regression-race\d+ v(\d+): (first|new|already) champion\b")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `mlflow server` for both races (about 6 s of CPU to start): each has an experiment and registered
    models of its own."""
    with mlflow_server(tmp_path_factory.mktemp("race") / "server") as running:
        yield running


def _reported(scores: list[float], index: int) -> float:
    """The test MSE worker `index` reports beside its validation score: in the reverse order, so a champion chosen
    on test would be the worst on validation."""
    return 2 * max(scores) - scores[index]


def _evaluate(index: int, rounds: list[tuple[str, list[float], bool]], barrier: Any, results: Any) -> None:
    """One evaluate per round: a training run with a real logged model, then the registry, racing the others.

    In a `settled` round every worker registers its version before any elects
    (so every claim must be the final champion); in the others registering and
    electing race too.
    """
    import faulthandler

    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.tracking import registry

    faulthandler.dump_traceback_later(900, exit=True)  # a hung worker shows where, and ends

    client = MlflowClient(tracking.tracking_uri())
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for model, scores, settled in rounds:
        train = client.create_run(experiment_id, tags={"stage": f"train@{model}"}).info.run_id
        client.set_tag(train, "model.digest", train)  # as the train stage tags its weights file's md5
        logged = client.create_logged_model(experiment_id, name=model, source_run_id=train)
        client.finalize_logged_model(logged.model_id, "READY")
        client.set_terminated(train)
        barrier.wait(timeout=300)
        if settled:
            registry._version_for_run(client, registry.registered_name(model), train, experiment_id, scores[index],
                                      _reported(scores, index), DIGEST)
            barrier.wait(timeout=300)
        with tracking.stage_run("evaluate", EXPERIMENT, {}, "evaluate") as run:
            report = run.register_model(model, train, scores[index], _reported(scores, index), DIGEST)
            if run.spool is not None:  # the failure message then says why the store failed
                report += f" (the store failed: {run.spool_reason})"
        results.put((model, index, train, scores[index], report))


@pytest.mark.slow
def test_concurrent_evaluates_leave_the_best_as_champion(server: Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    client.create_experiment(EXPERIMENT)
    shuffle = random.Random(19)
    rounds = []
    for r in range(ROUNDS):
        scores = [round(1 + 0.01 * k, 2) for k in range(WORKERS)]
        shuffle.shuffle(scores)  # who holds the best score differs each round
        rounds.append((f"race{r}", scores, r % 2 == 0))

    # fresh processes (no HTTP session or store of this one), forked from one that imported MLflow once: 8 spawned
    # workers spent about 2 s of CPU each importing it
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mlflow.tracking", "pipeline.tracking.registry", __name__])
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    workers = [ctx.Process(target=_evaluate, args=(i, rounds, barrier, results)) for i in range(WORKERS)]
    for w in workers:
        w.start()
    reports = []
    while len(reports) < WORKERS * ROUNDS:
        try:
            reports.append(results.get(timeout=5))
        except queue.Empty:
            dead = [w.exitcode for w in workers if not w.is_alive()]
            assert not dead, f"workers ended early with {dead} after {len(reports)} reports"
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0, f"worker {w.pid} exited {w.exitcode}"

    # a store failure under the load (a busy 2-core machine) spools that evaluate's registration, as it
    # would for a user: sync it, as a user would, and the final state must still be right
    spooled = [report for *_, report in reports if "waits in the spool" in report]
    if spooled:
        from pipeline.tracking import spool

        print("spooled under load, synced:", *spooled, *spool.sync_spool(), sep="\n")
    for model, scores, settled in rounds:
        name = f"regression-{model}"
        versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
        assert len(versions) == WORKERS, f"{name}: {len(versions)} versions"
        best = min(versions.values(), key=lambda v: float(v.tags["val_mse"]))
        champion = client.get_model_version_by_alias(name, "champion")
        assert float(best.tags["val_mse"]) == min(scores)
        assert champion.version == best.version, f"{name}: champion v{champion.version}, best v{best.version}"
        claims = {}
        for m, index, train, mse, report in reports:
            if m != model or report in spooled:
                continue
            assert report.startswith(f"{name} v"), report
            assert versions[report.split()[1][1:].rstrip(":")].run_id == train, report  # the line names this run's version
            if found := CLAIM.match(report):
                claims[found.group(1)] = report
        # a claim must hold at the end of its evaluate; when all registered before anyone elected,
        # nothing better can come after it, so every claim is the final champion
        if not any(r.startswith(f"{name}:") for r in spooled):  # (a registration by sync reports in sync's lines)
            assert str(champion.version) in claims, f"{name}: the champion's evaluate did not say so"
            if settled:
                assert set(claims) == {str(champion.version)}, f"{name}: {sorted(claims.values())}"
        for version, report in claims.items():
            earlier = [v for v in versions.values() if int(v.version) < int(version)]
            assert all(float(v.tags["val_mse"]) > float(versions[version].tags["val_mse"]) for v in earlier), report
    print(f"{ROUNDS} rounds x {WORKERS} concurrent evaluates (pid {os.getpid()}): champion = best every round")


# ---------------------------------------------------------------- whole evaluate stages, racing

STAGE_CLAIM = re.compile(r"^registry: (regression-linear_gd) v(\d+): (first|new|already) champion\b", re.M)
STAGE_REPORT = re.compile(r"^registry: (regression-linear_gd) v(\d+): (.*)$", re.M)
STAGE_RACE_ROUNDS = 2


@pytest.mark.slow
def test_eight_evaluate_stages_at_once_leave_the_best_as_champion(baseline: Path, server: Server,
                                                                  tmp_path: Path) -> None:
    """8 workspace copies, each with its own linear_gd weights (the baseline's, its bias shifted by another amount,
    so another test MSE) and the finished train@linear_gd run with a logged model that evaluate looks them up by,
    on one real server; then `python -m stages evaluate` in all 8 at once, twice (the registry emptied in between,
    so each round registers 8 versions in whatever order the race gives). Every round: `champion` is the version
    with the lowest test MSE, its evaluate said so and tagged so, and no evaluate claimed a version that was not
    the champion when it ended (no earlier version may be better than one it claimed).

    The training runs are made here, as the train stage leaves them in the store (tags stage and model.digest, a
    READY logged model): 8 train processes would cost the 2 cores about two minutes before the race starts."""
    import subprocess
    import sys
    import time

    import torch
    from mlflow.tracking import MlflowClient

    from pipeline import models
    from pipeline.files import md5_file
    from tests.helpers import clone, run_env, set_params

    env = run_env(MLFLOW_TRACKING_URI=server.url)
    client = MlflowClient(server.url)
    experiment_id = client.create_experiment("stage-race")
    shifts = [0.1 * (k + 1) for k in range(8)]
    random.Random(19).shuffle(shifts)  # the best copy is not the first or last started
    start = time.monotonic()
    copies = []
    for i, shift in enumerate(shifts):
        repo = clone(baseline, tmp_path / f"copy{i}")
        set_params(repo, {"mlflow.experiment": "stage-race"})
        weights = repo / "models" / "linear_gd.safetensors"
        model, spec = models.load_weights(weights)
        with torch.no_grad():
            model.bias += shift
        models.save_weights(model, spec, weights)
        train = client.create_run(experiment_id, tags={"stage": "train@linear_gd", "model.digest": md5_file(weights)})
        logged = client.create_logged_model(experiment_id, name="linear_gd", source_run_id=train.info.run_id)
        client.finalize_logged_model(logged.model_id, "READY")
        client.set_terminated(train.info.run_id)
        copies.append(repo)
    prepared = time.monotonic() - start

    def together(command: list[str], repos: list[Path]) -> list[subprocess.CompletedProcess[str]]:
        procs = [subprocess.Popen([sys.executable, "-m", "stages", *command], cwd=r, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in repos]
        done = []
        for r, p in zip(repos, procs):
            out, err = p.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
            assert p.returncode == 0 and "Traceback" not in err, f"{r}: {' '.join(command)}\n{out}\n{err}"
        return done

    name = "regression-linear_gd"
    timings = [f"8 copies and training runs {prepared:.0f} s"]
    for round_ in range(STAGE_RACE_ROUNDS):
        if round_:
            client.delete_registered_model(name)
        start, since = time.monotonic(), int(time.time() * 1000)
        done = together(["evaluate"], copies)
        timings.append(f"round {round_ + 1}: 8 evaluates {time.monotonic() - start:.0f} s")
        spooled = [r for r, p in zip(copies, done) if "waits in the spool" in p.stdout]
        for repo in spooled:  # a store failure under load spools a registration, as for a user: sync it
            synced = subprocess.run([sys.executable, "-m", "pipeline.tracking.spool"], cwd=repo, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert synced.returncode == 0, synced.stderr
            print(f"round {round_ + 1}: spooled under load, synced in {repo.name}:\n{synced.stdout}")

        versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
        assert len(versions) == len(copies), f"round {round_ + 1}: {len(versions)} versions"
        scores = {json.loads((r / "metrics" / "evaluation" / "linear_gd.json").read_text())["val_mse"] for r in copies}
        assert len(scores) == len(copies), f"the copies' validation MSEs are not all different: {scores}"
        best = min(versions.values(), key=lambda v: float(v.tags["val_mse"]))
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.version == best.version, f"round {round_ + 1}: champion v{champion.version}, best v{best.version}"
        assert len({v.tags["data.digest"] for v in versions.values()}) == 1
        claims, printed = {}, []
        for repo, proc in zip(copies, done):
            if repo in spooled:
                continue
            ((_, version, said),) = STAGE_REPORT.findall(proc.stdout)
            printed.append(f"{name} v{version}: {said}")
            if found := STAGE_CLAIM.search(proc.stdout):
                claims[found.group(2)] = said
        if not spooled:
            assert str(champion.version) in claims, f"round {round_ + 1}: the champion's evaluate did not say so"
            evaluates = client.search_runs([client.get_experiment_by_name("stage-race").experiment_id],
                                           f"tags.stage = 'evaluate' and attributes.start_time >= {since}")
            assert sorted(r.data.tags["registry.linear_gd"] for r in evaluates) == sorted(printed)  # tagged as printed
        for version, said in claims.items():  # it was the champion when its evaluate ended: no earlier version is better
            earlier = [v for v in versions.values() if int(v.version) < int(version)]
            assert all(float(v.tags["val_mse"]) > float(versions[version].tags["val_mse"]) for v in earlier), said
    print("\n" + "; ".join(timings))
