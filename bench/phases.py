"""What a tracked stage pays before and after its training, phase by phase, in one process.

Run: python -m bench.phases [repeats]. Prints the seconds of each import or call a
train stage makes (best of the repeats, each in a fresh process), to show which
fixed costs are torch's and MLflow's own (bench/RESULTS.md).
"""

from __future__ import annotations

import subprocess
import sys
import time

PHASES = """
import time
t = [time.perf_counter()]
import torch; t.append(time.perf_counter())
import mlflow; t.append(time.perf_counter())
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; t.append(time.perf_counter())
import torch._dynamo; t.append(time.perf_counter())
model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval()
torch.export.export(model, (torch.randn(5, 10),)); t.append(time.perf_counter())
from mlflow.utils.requirements_utils import _init_packages_to_modules_map
_init_packages_to_modules_map(); t.append(time.perf_counter())
print(" ".join(f"{b - a:.3f}" for a, b in zip(t, t[1:])))
"""
NAMES = (
    "import torch",
    "import mlflow",
    "import MLflow's SQLite store (SQLAlchemy, alembic)",
    "import torch._dynamo (torch.export needs it)",
    "torch.export of a small MLP (pt2 format)",
    "MLflow's installed-packages map (log_model's requirement check)",
)


def main(repeats: int = 3) -> None:
    """Best of `repeats` fresh processes for each phase."""
    best = [float("inf")] * len(NAMES)
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", PHASES], capture_output=True, text=True, check=True).stdout
        best = [min(b, float(x)) for b, x in zip(best, out.split())]
    for name, seconds in zip(NAMES, best):
        print(f"{seconds:7.2f} s  {name}")
    print(f"{sum(best):7.2f} s  in all ({time.strftime('%H:%M')}, best of {repeats})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
