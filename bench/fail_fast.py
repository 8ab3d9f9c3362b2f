"""How fast bad input is reported, against a normal (tiny) train stage.

Run: python bench/fail_fast.py [repeats]
Copies the tracked project into a temp git+DVC repo with tiny params, runs `dvc repro`
once, then times the stage entry point (and `dvc repro`) on each fault. Prints seconds
(median of the repeats) and the ratio to a normal train@linear_gd run.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": {"n_samples": 600}, "linear_gd": {"steps": 30}}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x.invalid", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@x.invalid")
    return env | extra


def _project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file() and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    _params(dest, {})
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"],
                [sys.executable, "-m", "dvc", "repro", "-q"]):
        subprocess.run(cmd, cwd=dest, env=_env(), check=True, capture_output=True)
    return dest


def _params(repo: Path, override: dict) -> None:
    committed = ["git", "show", "HEAD:params.yaml"]  # the defaults, not the workspace's edits
    params = yaml.safe_load(subprocess.run(committed, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    for section, values in (TINY | override).items():
        if isinstance(values, dict):
            params[section] |= values
        else:
            params[section] = values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _time(repo: Path, cmd: list[str], env: dict[str, str], repeats: int) -> tuple[float, str]:
    seconds, last = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        last = (proc.stderr.strip().splitlines() or [""])[-1] if proc.returncode else "(ok)"
    return statistics.median(seconds), last


def main(repeats: int = 3) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        repo = _project(Path(tmp) / "repo")
        stage = [sys.executable, "-m", "stages.train", "linear_gd"]
        cases = [
            ("normal train@linear_gd (tiny)", {}, stage, {}),
            ("typo mlp.lrr (stage)", {"mlp": {"lrr": 0.1}}, stage, {}),
            ("device: cuda, no CUDA (stage)", {"device": "cuda"}, stage, {}),
            ("tracking server down (stage)", {}, stage, {"MLFLOW_TRACKING_URI": down}),
            ("typo linear_gd.lrr (dvc repro)", {"linear_gd": {"lrr": 0.1}}, [sys.executable, "-m", "dvc", "repro"], {}),
        ]
        base = None
        print(f"{'case':34} {'seconds':>8} {'ratio':>6}  last line")
        for name, override, cmd, extra in cases:
            _params(repo, override)
            seconds, last = _time(repo, cmd, _env(**extra), repeats)
            base = base or seconds
            print(f"{name:34} {seconds:8.2f} {seconds / base:6.2f}  {last[:110]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
