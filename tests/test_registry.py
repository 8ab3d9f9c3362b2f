"""The model registry: registration and the `champion` rule on a real SQLite store, then the
end to end path: two `dvc repro` runs with different MLP params, and the champion served."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import serve, tracking
from pipeline.errors import PipelineError
from tests.helpers import background, dvc, free_port, model_names, post, post_chunked, run_env, set_params

EXPERIMENT = "registry-test"
DATA, OTHER_DATA = "d" * 32, "e" * 32


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace whose embedded store the tracking code uses."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def _trained(model: str = "linear") -> str:
    """A finished train run with a real logged model (a tiny linear model's weights file); return its run id
    (also its model.digest, as the train stage tags its weights file's md5)."""
    from pipeline import models

    weights = Path(os.environ["DVC_ROOT"]) / f"{model}.safetensors"  # the `workspace` fixture's folder
    spec = models.ModelSpec("linear", 3)
    models.save_weights(models.build(spec), spec, weights)
    with tracking.stage_run(f"train@{model}", EXPERIMENT, {"model": model}, f"train@{model}") as run:
        run.log_torch_model(weights, np.zeros((2, 3), dtype=np.float32))
        run.set_tags({"model.digest": run.run_id})
    return run.run_id


TEST_MSE = 3.0  # the test score the cases below report beside the validation score that decides


def _register(model: str, train_run: str, val_mse: float, digest: str = DATA, test_mse: float = TEST_MSE) -> str | None:
    """What evaluate does for the model whose weights `train_run` wrote: register it, perhaps promote it."""
    with tracking.stage_run("evaluate", EXPERIMENT, {}, "evaluate") as run:
        return run.register_model(model, train_run, val_mse, test_mse, digest)


def _champion(client: Any, model: str = "linear") -> str:
    return str(client.get_model_version_by_alias(tracking.registered_name(model), tracking.CHAMPION).version)


def test_champion_moves_only_on_a_better_score_on_the_same_data(workspace: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    first, better, tie, worse, other = (_trained() for _ in range(5))

    assert _register("linear", first, 2.0) == "regression-linear v1: first champion (val_mse 2; test_mse 3)"
    assert _register("linear", first, 2.0) == "regression-linear v1: already champion (val_mse 2; test_mse 3)"  # again
    assert _register("linear", better, 1.5) == "regression-linear v2: new champion (val_mse 1.5 < 2 of v1; test_mse 3)"
    assert _champion(client) == "2"
    assert _register("linear", tie, 1.5) == "regression-linear v3: champion stays v2 (val_mse 1.5 <= 1.5; test_mse 3, this one 3)"
    assert _register("linear", worse, 1.7) == "regression-linear v4: champion stays v2 (val_mse 1.5 <= 1.7; test_mse 3, this one 3)"
    report = _register("linear", other, 0.1, OTHER_DATA)
    assert report.startswith("regression-linear v5: not compared: champion v2 was scored on other data"), report
    assert _champion(client) == "2"

    versions = client.search_model_versions("name = 'regression-linear'")
    assert sorted((str(v.version), v.run_id) for v in versions) == [
        (str(i), run) for i, run in enumerate((first, better, tie, worse, other), start=1)
    ]
    v2 = client.get_model_version("regression-linear", "2")
    assert v2.tags == {"data.digest": DATA, "val_mse": "1.5", "test_mse": "3.0"} and v2.source.startswith("models:/m-")


def test_champion_is_chosen_on_validation_not_on_test(workspace: Path) -> None:
    """The test split is for reporting: a version better on validation wins even where its test MSE is worse,
    and one better only on test does not move the alias. The test MSE is tagged and printed beside."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    val_best, test_best, later = (_trained() for _ in range(3))
    assert _register("linear", val_best, 1.0, test_mse=5.0) == "regression-linear v1: first champion (val_mse 1; test_mse 5)"
    report = _register("linear", test_best, 2.0, test_mse=0.5)  # a test-set comparison would pick this one
    assert report == "regression-linear v2: champion stays v1 (val_mse 1 <= 2; test_mse 5, this one 0.5)"
    assert _champion(client) == "1"
    report = _register("linear", later, 0.9, test_mse=9.0)  # better on validation, worst on test: champion
    assert report == "regression-linear v3: new champion (val_mse 0.9 < 1 of v1; test_mse 9)"
    assert _champion(client) == "3"
    tags = {str(v.version): v.tags for v in client.search_model_versions("name = 'regression-linear'")}
    assert {v: (t["val_mse"], t["test_mse"]) for v, t in tags.items()} == {
        "1": ("1.0", "5.0"), "2": ("2.0", "0.5"), "3": ("0.9", "9.0")}
    evaluate = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.stage = 'evaluate'",
                                  order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert evaluate.data.tags["registry.linear"] == report  # the line is kept on the evaluate run


def test_run_without_logged_model_is_not_registered(workspace: Path) -> None:
    with tracking.stage_run("train@mlp", EXPERIMENT, {}, "train@mlp") as run:
        run.set_tags({"model.digest": "w1"})
    assert _register("mlp", "w1", 1.0) == f"regression-mlp: training run {run.run_id} logged no model; nothing registered"
    assert _register("mlp", "w2", 1.0) is None  # no training run wrote these weights: nothing to register


@pytest.mark.bad_input
def test_serve_refuses_bad_input_in_one_line(workspace: Path) -> None:
    known = ", ".join(sorted(model_names()))  # serve checks a name against pipeline/zoo/, not params.yaml
    with pytest.raises(PipelineError, match=f"unknown model 'cnn'; allowed: {known} \\(the modules in pipeline/zoo/\\)"):
        serve.command("cnn", "5000")
    with pytest.raises(PipelineError, match=r"PORT must be a TCP port number \(1-65535\), got '70000'"):
        serve.command("mlp", "70000")
    with pytest.raises(PipelineError, match="no MLflow store at"):
        serve.command("mlp", "5000")
    _trained("mlp")  # a store now exists, but nothing is registered in it
    with pytest.raises(PipelineError, match="no regression-mlp@champion in the model registry"):
        serve.command("mlp", "5000")


def _predictions(project: Path) -> list[float]:
    """The mlp's test predictions as evaluate wrote them (the first evaluate.plot_points rows)."""
    with open(project / "plots" / "predictions" / "mlp.csv", newline="") as fh:
        return [float(row["predicted"]) for row in csv.DictReader(fh)]


def _latest_evaluate_tags(project: Path) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("regression").experiment_id], "tags.stage = 'evaluate'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].data.tags


def _serve(project: Path, model: str, rows: list[list[float]]) -> tuple[list[float], str]:
    """Start `python -m pipeline.serve` (what `./tasks.sh serve` runs), post rows, stop its process group;
    the predictions and the server's log."""
    port = str(free_port())
    log = project / "serve.log"
    cmd = [sys.executable, "-m", "pipeline.serve", model]
    with background(cmd, f"http://127.0.0.1:{port}/health", log, project, run_env(PORT=port)):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": rows}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
        ready = f"serve: model server ready at http://127.0.0.1:{port} (POST rows to /invocations)"
        for _ in range(100):  # the ready line comes from a poller that checks every 0.25 s
            if ready in log.read_text(errors="replace").splitlines():
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no line {ready!r} in:\n{log.read_text(errors='replace')}")
    return [p[0] for p in answer["predictions"]], log.read_text()


def test_request_limits_count_structure_and_numbers_not_strings() -> None:
    from pipeline.tracking.serving import MAX_DEPTH, MAX_DIGITS, json_problem

    assert json_problem(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) == ""
    assert "nested more than" in json_problem(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    assert json_problem(b'{"inputs": [["' + b"[{" * 100 + b'\\"' + b"7" * 5000 + b'"]]}') == ""  # inside a string
    assert json_problem(b"[[" + b"7" * MAX_DIGITS + b"]]") == ""
    assert f"more than {MAX_DIGITS} digits" in json_problem(b"[[" + b"7" * (MAX_DIGITS + 1) + b"]]")


@pytest.mark.slow
@pytest.mark.bad_input
def test_served_champion_refuses_huge_or_deep_requests_in_one_line(workspace: Path, request: pytest.FixtureRequest) -> None:
    """A body over the cap is 413, JSON nested too deep or a number of thousands of digits 400: one line, no traceback
    in the server's log, and the server answers the next request (MLflow alone answered such bodies 500)."""
    from pipeline.tracking.serving import MAX_BODY_BYTES, MAX_DEPTH, MAX_DIGITS

    _register("mlp", _trained("mlp"), 1.0)  # a champion of 3 features
    port = str(free_port())
    url, log, good = f"http://127.0.0.1:{port}", workspace / "serve.log", b'{"inputs": [[0.5, 0.5, 0.5]]}'
    row = b"[0.5, 0.5, 0.5],"
    cases: dict[str, tuple[Any, str, int, str]] = {  # name -> (body or chunks, content type, status, the line says)
        "20 MB integer": (b'{"inputs": [[' + b"7" * 20_000_000 + b", 1, 1]]}", "application/json", 413,
                          f"the request body has 20000022 bytes; at most {MAX_BODY_BYTES} bytes are accepted"),
        "rows over the cap": (b'{"inputs": [' + row * (MAX_BODY_BYTES // len(row)) + b"[0.5, 0.5, 0.5]]}",
                              "application/json", 413, "send the rows in smaller batches"),
        "20 MB integer as CSV": (b"x0,x1,x2\n" + b"7" * 20_000_000 + b",1,1\n", "text/csv", 413, "at most"),
        "nested 5,000 deep": (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400,
                              f"nested more than {MAX_DEPTH} levels deep; at most {MAX_DEPTH} are accepted"),
        "an integer of 5,000 digits": (b'{"inputs": [[' + b"7" * 5000 + b", 1, 1]]}", "application/json", 400,
                                       f"a number of more than {MAX_DIGITS} digits"),
        "chunked, over the cap": ([b'{"inputs": [' + row * 100_000] * 11, "application/json", 413,  # no length given
                                  f"the request body has more than {MAX_BODY_BYTES} bytes"),
    }
    with background([sys.executable, "-m", "pipeline.serve", "mlp"], f"{url}/health", log, workspace,
                    run_env(PORT=port, DVC_ROOT=str(workspace))):
        answers = {name: post_chunked(url, body, kind) if isinstance(body, list) else post(url, body, kind)
                   for name, (body, kind, _, _) in cases.items()}
        assert post(url, good, "application/json")[0] == 200  # still serving
    for name, (_, _, status, says) in cases.items():
        got, body = answers[name]
        assert got == status and "\n" not in body.strip() and says in json.loads(body)["message"], (name, got, body[:500])
    served = log.read_text()
    assert "Traceback" not in served and " 500 " not in served, served[-3000:]
    request.node.user_properties.append(("bad_input_cases", len(cases)))


@pytest.mark.slow
def test_better_mlp_becomes_champion_and_is_served(project: Path) -> None:
    """Two pipeline runs with different MLP params: @champion is the lower validation MSE, and serving it
    answers with the predictions evaluate wrote for that model."""
    runs: dict[str, tuple[float, list[float]]] = {}  # train run id -> (validation MSE, evaluate's predictions)
    for epochs in (1, 12):
        set_params(project, {"mlp.epochs": epochs})
        out = dvc(project, "repro").stdout
        assert "registry: regression-mlp v" in out, out
        tags = _latest_evaluate_tags(project)
        mse = json.loads((project / "metrics" / "evaluation" / "mlp.json").read_text())["val_mse"]
        runs[tags["scored.mlp.run_id"]] = (mse, _predictions(project))
    assert len(runs) == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("regression-mlp", "champion")
    best = min(runs, key=lambda run_id: runs[run_id][0])
    assert best == list(runs)[1], runs  # 12 epochs beat 1: the alias had to move
    assert champion.run_id == best
    assert len(client.search_model_versions("name = 'regression-linear'")) == 1  # retrained? no: registered once
    status = dvc(project, "status").stdout
    assert "Data and pipelines are up to date." in status, status  # registering changed nothing DVC tracks

    import pandas as pd

    test = pd.read_parquet(project / "data" / "test.parquet")
    expected = runs[best][1]
    rows = test.drop(columns="y").to_numpy(dtype=np.float32)[: len(expected)].tolist()
    served, log = _serve(project, "mlp", rows)
    assert served == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert f"serve: regression-mlp version {champion.version} (alias @champion) from sqlite:///" in log, log

    import torch

    from pipeline import models

    weights, _ = models.load_weights(project / "models" / "mlp.safetensors")  # the 12-epoch run: the champion
    with torch.no_grad():
        from_weights = weights(torch.tensor(rows)).numpy().ravel()
    np.testing.assert_allclose(served, from_weights, rtol=1e-6, atol=1e-6)
    with pytest.MonkeyPatch.context() as env:  # the one-call nn.Module, from the registry alias
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        module = tracking.load_torch_module("models:/regression-mlp@champion")
    with torch.no_grad():
        assert torch.equal(module(torch.tensor(rows)), weights(torch.tensor(rows)))
