"""The benchmark keeps working: `python -m bench --tiny` runs every section and prints every row.

No timing is asserted (the machine is shared); only that each figure was measured.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_env


ROWS = (
    "mlp loop, tracking on",
    "mlp loop vs DataLoader",
    "linear_gd loop",
    "mlp loop, live logging + system metrics",
    "GPU throughput",  # the skip row without CUDA; with CUDA the "mlp loop on CUDA (graphs)" rows
    "cold dvc repro (5 stages), warm server",
    "first ./tasks.sh repro (server start + repro)",
    "dvc repro after mlp.lr changed",
    "stages rerun after mlp.lr changed",
    "no-op dvc repro",
    "dvc exp show --json, warm",
    "train@mlp stage, warm",
    "warm stage start-up (1-step train@linear_gd)",
    "2 queued [128,128] experiments, -j 2",
    "[128,128] train@mlp, two at once",
    "[128,128] train@mlp, beside a busy process",
    "full test suite (pytest, fresh clone)",  # skipped with --tiny, and says so
    "generate stage, 5,000 rows x 20",
    "generate peak RSS",
    "train@linear_gd peak RSS",
    "search best val MSE (20 TPE trials, pruned)",
    "search training epochs",
)


@pytest.mark.slow
def test_tiny_benchmark_prints_every_row() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--scale-rows", "5000"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("CPU: "), out[:200]
    table = out[out.index("figure ") :]
    for name in ROWS:
        if name == "GPU throughput" and "GPU: none" not in out:
            name = "mlp loop on CUDA (graphs)"
        line = next((ln for ln in table.splitlines() if ln.strip().startswith(name)), None)
        assert line is not None, f"row {name!r} missing from:\n{table}"
        if name not in ("GPU throughput", "full test suite (pytest, fresh clone)", "2 queued [128,128] experiments, -j 2"):
            assert re.search(r"\d", line[len(name) + 2 :]), f"row {name!r} has no figure: {line}"
    assert "full test suite (pytest, fresh clone): skipped (--tiny or --no-suite)" in out, out
    assert "2 queued [128,128] experiments, -j 2: skipped (--tiny)" in out, out
    assert out.count("cold: not timed (--tiny)") == 2, out  # the train stage's and the start-up's notes
    # a real DVC run: changing mlp.lr reruns exactly train@mlp and evaluate
    assert re.search(r"stages rerun after mlp\.lr changed: train@mlp, evaluate", out), table


def test_a_cold_figure_is_noted_beside_its_warm_one_unless_tiny() -> None:
    from bench.workflow import _cold_note

    assert _cold_note({"warm": 0.5, "cold": 3.0, "bare": 1.5}, "bare") == "cold (a process of its own) 3.00 s, 2.00x"
    assert _cold_note({"warm": 0.5, "bare": 1.5}, "bare") == "cold: not timed (--tiny)"


def test_bad_arguments_are_one_line_errors() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "throughput,nope"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown section(s) ['nope']" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gpu_rows_compare_the_graph_loop_with_eager_cpu_and_large() -> None:
    """The GPU section's code, run on the CPU at small sizes: every row measured, the issue's three targets set."""
    from bench import loops
    from pipeline import config

    params = loops._with(config.load(ROOT / "params.yaml"), **{"data.n_samples": 2000})
    rows = loops.gpu(params, epochs=1, repeats=1, big_rows=6000, accelerator="cpu")
    assert [r.baseline_name for r in rows] == [
        "bare eager CUDA loop", "same loop, cuda_graph: false", "this machine's CPU, same loop", "this machine's CPU",
    ]
    assert all(r.figure and r.baseline for r in rows)
    assert [r.target for r in rows] == [(">=", 4.0), None, (">=", 2.0), (">=", 10.0)]
    assert rows[3].name == "train@mlp loop at 6,000 rows, CUDA" and "batch 4096" in rows[3].note
