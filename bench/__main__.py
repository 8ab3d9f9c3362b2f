"""python -m bench: every performance figure of the project against its baseline, in one run.

Prints the machine, then one table: training throughput (CPU, and CUDA when present),
tracking overhead, stage start-up, the user's DVC loop, generation/training at scale, the
cost of training checkpoints, and a pruned TPE search against a grid.
`--tiny` shrinks every size so the whole run takes about a minute (the smoke test uses it);
its ratios measure mostly fixed costs and say little about the real targets.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("throughput", "live", "workflow", "scale", "gpu", "checkpoint", "search")


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and one repeat: checks that it runs, ~1 min")
    parser.add_argument("--scale-rows", type=int, default=None, metavar="N",
                        help="rows for the scale figures (default 10,000,000; 20,000 with --tiny)")
    parser.add_argument("--scale-features", type=int, default=20, metavar="D", help="features for the scale figures")
    parser.add_argument("--repeats", type=int, default=None, metavar="R",
                        help="timings per figure, best kept (default 3; 1 with --tiny)")
    parser.add_argument("--epochs", type=int, default=None, metavar="E",
                        help="epochs per throughput timing (default 10; 1 with --tiny)")
    parser.add_argument("--no-suite", action="store_true",
                        help="leave out the workflow section's full-test-suite row (it runs the whole suite)")
    parser.add_argument("--search-trials", type=int, default=20, metavar="N",
                        help="trials of the search section's study (default 20)")
    parser.add_argument("--only", default=",".join(SECTIONS), metavar="LIST",
                        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    for name in ("scale_rows", "scale_features", "repeats", "epochs", "search_trials"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: got {value}; must be >= 1")
    args.scale_rows = args.scale_rows or (20_000 if args.tiny else 10_000_000)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.epochs = args.epochs or (1 if args.tiny else 10)
    return args


def main(argv: list[str]) -> int:
    """Run the chosen sections, print the table; exit 0 whether or not targets are met."""
    args = _args(argv)
    import torch

    from bench import loops, report, workflow
    from bench.workspace import TINY, committed_params, update_params
    from pipeline import config

    print(report.machine(), flush=True)
    updates = TINY if args.tiny else {}
    rows: list[report.Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(committed_params())  # the defaults, not the workspace's edits
        params = config.load(work / "params.yaml")
        if "throughput" in args.only:
            print("measuring training throughput (CPU) ...", flush=True)
            rows += loops.throughput(params, torch.device("cpu"), epochs=args.epochs, repeats=args.repeats)
        if "live" in args.only:
            print("measuring the cost of live logging and system metrics (CPU; and CUDA when present) ...", flush=True)
            epochs = args.epochs if args.tiny else max(args.epochs, params.mlp.epochs)  # the stage's training at least
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                rows += loops.live_cost(params, torch.device(device), epochs=epochs, repeats=args.repeats)
        if "gpu" in args.only:
            if torch.cuda.is_available():
                print("measuring training throughput (CUDA against the eager loop and this CPU) ...", flush=True)
                big_rows = 20_000 if args.tiny else 1_000_000
                rows += loops.gpu(params, epochs=args.epochs, repeats=args.repeats, big_rows=big_rows)
            else:
                rows.append(report.Row("GPU throughput", None, None, "", note="skipped: no CUDA device on this machine"))
        if "checkpoint" in args.only:
            ckpt_rows = 20_000 if args.tiny else 1_000_000
            print(f"measuring the cost of training checkpoints at {ckpt_rows:,} rows ...", flush=True)
            rows += loops.checkpoint_cost(params, rows=ckpt_rows, epochs=max(2, args.epochs // 3), repeats=args.repeats)
        if "search" in args.only:
            from bench.search import search_rows

            size = f"{params.data.n_samples:,} rows" if not args.tiny else "tiny data"
            print(f"measuring a {args.search_trials}-trial pruned TPE search against a grid ({size}) ...", flush=True)
            search_params = config.parse(update_params(params.model_dump(), updates)) if updates else params
            rows += search_rows(search_params, work, args.search_trials)
        if "workflow" in args.only:
            print("measuring the train stage, stage start-up, the DVC loop and the test suite ...", flush=True)
            rows += workflow.workflow_rows(work, updates, args.repeats, with_suite=not (args.tiny or args.no_suite),
                                           tiny=args.tiny)
        if "scale" in args.only:
            print(f"measuring generation and training at {args.scale_rows:,} rows ...", flush=True)
            rows += workflow.scale(work, updates, args.scale_rows, args.scale_features)
    print()
    print(report.table(rows))
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
