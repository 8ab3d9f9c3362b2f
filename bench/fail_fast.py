"""How fast bad input is reported, against a normal (tiny) train stage.

Run: python bench/fail_fast.py [repeats]
Copies the tracked project into a temp git+DVC repo with tiny params, runs `dvc repro`
once, then times the stage entry point (and `dvc repro`) on each fault. Prints seconds
(median of the repeats) and the ratio to a normal train@linear_gd run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable
from bench.workspace import TINY, copy_project, env, free_port, set_params  # noqa: E402


def _time(repo: Path, cmd: list[str], environ: dict[str, str], repeats: int) -> tuple[float, str]:
    seconds, last = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=repo, env=environ, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        last = (proc.stderr.strip().splitlines() or [""])[-1] if proc.returncode else "(ok)"
    return statistics.median(seconds), last


def main(repeats: int = 3) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_project(Path(tmp) / "repo", TINY)
        subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=repo, env=env(), check=True, capture_output=True)
        tiny = (repo / "params.yaml").read_text()
        stage = [sys.executable, "-m", "stages", "train", "linear_gd"]
        cases: list[tuple[str, dict[str, Any], list[str], dict[str, str]]] = [
            ("normal train@linear_gd (tiny)", {}, stage, {}),
            ("typo mlp.lrr (stage)", {"mlp.lrr": 0.1}, stage, {}),
            ("device: cuda, no CUDA (stage)", {"device": "cuda"}, stage, {}),
            ("tracking server down (stage)", {}, stage, {"MLFLOW_TRACKING_URI": down}),
            ("typo linear_gd.lrr (dvc repro)", {"linear_gd.lrr": 0.1}, [sys.executable, "-m", "dvc", "repro"], {}),
        ]
        base = None
        print(f"{'case':34} {'seconds':>8} {'ratio':>6}  last line")
        for name, override, cmd, extra in cases:
            (repo / "params.yaml").write_text(tiny)
            set_params(repo, override)
            seconds, last = _time(repo, cmd, env(**extra), repeats)
            base = base or seconds
            print(f"{name:34} {seconds:8.2f} {seconds / base:6.2f}  {last[:110]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
