"""What a tracked train stage pays around its training, phase by phase, in one process.

Run: python -m bench.phases [repeats]. Prints the seconds of each import or call a
train stage makes to log its model (best of the repeats, each in a fresh process, on
an embedded SQLite store created beforehand), to show which fixed costs are torch's
and MLflow's own (bench/RESULTS.md). The model is logged as the project logs it: the
weights file plus the code that rebuilds it (pipeline/tracking/torch_model.py), so no
phase imports torch's compiler; the last line says whether one was loaded anyway.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from bench.workspace import ROOT, env

SETUP = """
from pipeline import tracking
with tracking.stage_run("train@mlp", "phases", "setup", {"model": "mlp"}):
    pass
"""
PHASES = """
import time
t = [time.perf_counter()]
import torch; t.append(time.perf_counter())
import mlflow; t.append(time.perf_counter())
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; t.append(time.perf_counter())
import sys
from pathlib import Path
import numpy as np
from pipeline import models, tracking
spec = models.ModelSpec("mlp", 10, (64, 64), "relu", 0.0)
weights = Path(sys.argv[1]) / "mlp.safetensors"
models.save_weights(models.build(spec), spec, weights); t.append(time.perf_counter())
with tracking.stage_run("train@mlp", "phases", "train@mlp", {"model": "mlp"}) as run:
    t.append(time.perf_counter())
    run.log_torch_model(weights, np.zeros((5, 10), dtype=np.float32)); t.append(time.perf_counter())
t.append(time.perf_counter())
compiler = [m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor"))]
print(" ".join(f"{b - a:.3f}" for a, b in zip(t, t[1:])), len(compiler))
"""
NAMES = (
    "import torch",
    "import mlflow",
    "import MLflow's SQLite store (SQLAlchemy, alembic)",
    "import the project, build and save the weights (safetensors)",
    "open the store and start the run",
    "log the model (pyfunc from code over the weights)",
    "end the run",
)


def main(repeats: int = 3) -> None:
    """Best of `repeats` fresh processes for each phase."""
    best = [float("inf")] * len(NAMES)
    compiler = 0
    with tempfile.TemporaryDirectory(prefix="bench-phases-") as workspace:
        run_env = env(DVC_ROOT=workspace, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-c", SETUP], env=run_env, cwd=workspace, check=True, capture_output=True)
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", PHASES, workspace], env=run_env, cwd=workspace,
                                 capture_output=True, text=True, check=True).stdout.split()
            best = [min(b, float(x)) for b, x in zip(best, out)]
            compiler = max(compiler, int(out[-1]))
    for name, seconds in zip(NAMES, best):
        print(f"{seconds:7.2f} s  {name}")
    print(f"{sum(best):7.2f} s  in all ({time.strftime('%H:%M')}, best of {repeats})")
    print(f"torch._dynamo/_inductor modules loaded: {compiler}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
