"""Compare the trained models in the MLflow store: `python -m pipeline.compare`.

One row per distinct trained model (runs with the same weights digest are one
model; the newest evaluated run stands for it), the best `--limit` by test MSE
per model kind, sorted by test MSE. Only the params whose values differ between
the rows are shown, so a sweep reads as the knobs it turned; the `source` column
tells runs of one stage apart (the DVC experiment name, else the short commit,
marked `(uncommitted)` when params or code were edited). Numbers get as many
digits as it takes for different values to print differently. The store is the one every
stage uses (MLFLOW_TRACKING_URI, else the workspace's mlflow.db); MLflow is
queried by pipeline/tracking/reading.py, this module only shapes and prints the rows.

    python -m pipeline.compare                      # aligned table
    python -m pipeline.compare --format markdown    # or csv, json
    python -m pipeline.compare --model <model> --limit 20
    python -m pipeline.compare --study search       # the trials of a search, best validation loss first
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from pipeline import config, warm
from pipeline.errors import PipelineError

FORMATS = ("table", "csv", "json", "markdown")
DATA_KEY = "data"  # pseudo-param: the dataset digest, shown when rows were trained on different data
# (column, where it comes from, how table/markdown print it: format type and its least precision)
METRIC_COLUMNS: tuple[tuple[str, str, tuple[str, int]], ...] = (
    ("val_mse", "best_val_loss", ("g", 4)),
    ("test_mse", "test_mse", ("g", 4)),
    ("vs_lstsq", "ratio_to_least_squares", ("f", 3)),
    ("vs_floor", "ratio_to_noise_floor", ("f", 3)),
)
MOST_DIGITS = 10  # values that still print alike with this many digits are equal for any purpose here
TAIL_COLUMNS = ("device", "train_s", "run_s", "run_id")


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _record(run: dict[str, Any]) -> dict[str, Any]:
    """A run as the row it becomes: identity, all params (plus data digest), scores, cost."""
    tags, metrics = run["tags"], run["metrics"]
    params = {k: v for k, v in run["params"].items() if k != "model"}  # the row's own `model` column shows it
    if digest := tags.get("data.digest"):
        params[DATA_KEY] = digest[:8]
    end, start = run.get("end_time"), run.get("start_time")
    record: dict[str, Any] = {
        "run": run["run_name"],
        "model": tags.get("model") or tags.get("stage", "").removeprefix("train@"),
        "source": source(tags),
        "params": params,
    }
    record |= {col: _number(metrics.get(key)) for col, key, _ in METRIC_COLUMNS}
    record |= {
        "device": tags.get("device", ""),
        "train_s": _number(metrics.get("train_seconds")),
        "run_s": (end - start) / 1000 if end and start else None,
        "run_id": run["run_id"],
        "pipeline": tags.get("pipeline", ""),
        "start_time": start or 0,
        "digest": tags.get("model.digest") or run["run_id"],
    }
    return record


def source(tags: dict[str, str]) -> str:
    """Where a run's code and params came from: its DVC experiment, else its commit (and whether it was edited)."""
    if name := tags.get("dvc.exp_name"):
        return name
    commit = tags.get("git.commit", "")
    if not commit or commit == "unknown":
        return "-"
    return commit[:7] + (" (uncommitted)" if "+" in tags.get("pipeline", "") else "")


def _rank(record: dict[str, Any]) -> tuple[bool, float, int]:
    """Sort key: best test MSE first, unscored rows last, newest first among equals."""
    return record["test_mse"] is None, record["test_mse"] or 0.0, -record["start_time"]


def select(runs: Sequence[dict[str, Any]], limit: int, models: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The best `limit` distinct models per kind by test MSE (unscored rows last), best first."""
    best: dict[str, dict[str, Any]] = {}
    for record in map(_record, runs):
        if models and record["model"] not in models:
            continue
        # Same weights = same model; the run evaluate scored (newest among them) represents it.
        key = (record["test_mse"] is not None, record["start_time"])
        held = best.get(record["digest"])
        if held is None or key > (held["test_mse"] is not None, held["start_time"]):
            best[record["digest"]] = record
    per_model: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(best.values(), key=_rank):  # sort first, then keep the best `limit` of each kind
        kept = per_model.setdefault(record["model"], [])
        if len(kept) < limit:
            kept.append(record)
    return sorted((r for kept in per_model.values() for r in kept), key=_rank)


def differing_params(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Params with at least two distinct values among the rows that have them (data digest first)."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for key, value in row["params"].items():
            values.setdefault(key, set()).add(str(value))
    keys = sorted(k for k, seen in values.items() if len(seen) > 1)
    return sorted(keys, key=lambda k: k != DATA_KEY)


def precisions(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Per metric column, the format with the fewest digits (from its least) that prints distinct values distinctly."""
    formats = {}
    for col, _, (kind, digits) in METRIC_COLUMNS:
        values = {row[col] for row in rows if row[col] is not None}
        while digits < MOST_DIGITS and len({f"{v:.{digits}{kind}}" for v in values}) < len(values):
            digits += 1
        formats[col] = f"{{:.{digits}{kind}}}"
    return formats


def _cells(row: dict[str, Any], keys: Sequence[str], formats: dict[str, str]) -> list[str]:
    """One row as printed text: metrics to `formats`, seconds to 0.1, '-' for missing."""
    cells = [row["run"], row["model"], row["source"], *(str(row["params"].get(k, "-")) for k in keys)]
    cells += ["-" if row[col] is None else formats[col].format(row[col]) for col, _, _ in METRIC_COLUMNS]
    cells.append(row["device"] or "-")
    cells += ["-" if row[col] is None else f"{row[col]:.1f}" for col in ("train_s", "run_s")]
    cells.append(row["run_id"])
    return cells


def _header(keys: Sequence[str]) -> list[str]:
    return ["run", "model", "source", *keys, *(c for c, _, _ in METRIC_COLUMNS), *TAIL_COLUMNS]


def _numeric(header: Sequence[str]) -> list[bool]:
    return [h in {c for c, _, _ in METRIC_COLUMNS} | {"train_s", "run_s"} for h in header]


def render_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """Aligned plain-text columns (numbers right-aligned); run ids shortened to 8 characters."""
    header = _header(keys)
    formats = precisions(rows)
    body = [_cells(r, keys, formats) for r in rows]
    for cells in body:
        cells[-1] = cells[-1][:8]
    return _aligned(header, body, _numeric(header), rule=True)


def _aligned(header: Sequence[str], body: Sequence[Sequence[str]], numeric: Sequence[bool], rule: bool) -> str:
    """Columns as wide as their widest cell, two spaces apart, numeric ones right-aligned; a dashed rule if asked."""
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    dashes = ["  ".join("-" * w for w in widths)] if rule else []
    return "\n".join([line(header), *dashes, *map(line, body)]) + "\n"


def render_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table, numeric columns right-aligned."""
    header = _header(keys)
    align = ["---:" if num else "---" for num in _numeric(header)]
    formats = precisions(rows)
    lines = [header, align, *(_cells(r, keys, formats) for r in rows)]
    return "".join("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n" for cells in lines)


def _plain(value: Any) -> Any:
    """JSON has no Infinity/NaN: a non-finite ratio (noise floor 0) becomes null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _export(row: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The machine-readable row: full precision, full run id, the differing params, the pipeline tag."""
    out = {"run": row["run"], "model": row["model"], "source": row["source"],
           "params": {k: row["params"][k] for k in keys if k in row["params"]}}
    out |= {c: _plain(row[c]) for c, _, _ in METRIC_COLUMNS}
    out |= {c: _plain(row[c]) for c in TAIL_COLUMNS}
    out["pipeline"] = row["pipeline"]
    return out


def render_json(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """A JSON list of row objects; `params` holds only the params that differ."""
    return json.dumps([_export(r, keys) for r in rows], indent=2) + "\n"


def render_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """CSV with one column per differing param; empty cell where a row lacks it."""
    header = [*_header(keys), "pipeline"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = _export(row, keys)
        params = flat.pop("params")
        writer.writerow({**flat, **params})
    return buf.getvalue()


def study_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A study's training runs as trial rows, best validation loss first; pruned after complete, unfinished last."""
    rows = []
    for run in runs:
        tags = run["tags"]
        rows.append({
            "trial": int(tags["search.trial"]) if tags.get("search.trial", "").isdigit() else None,
            "state": tags.get("search.state", run["status"].lower()),
            "val_mse": _number(run["metrics"].get("best_val_loss")),
            "epochs": _number(run["metrics"].get("steps_run")),
            "dvc_exp": tags.get("dvc.exp_name", ""),
            "params": {k: v for k, v in run["params"].items() if k.startswith(f"{tags.get('model')}.")},
            "run_id": run["run_id"],
        })
    rank = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (rank.get(r["state"], 2), r["val_mse"] is None, r["val_mse"] or 0.0, r["trial"] or 0))
    return rows


def render_study(rows: Sequence[dict[str, Any]]) -> str:
    """The trials as an aligned table: only the params that differ between them."""
    keys = differing_params(rows)
    header = ["trial", "state", "val_mse", "epochs", *keys, "dvc_exp", "run_id"]
    body = [[
        "-" if r["trial"] is None else str(r["trial"]), r["state"],
        "-" if r["val_mse"] is None else f"{r['val_mse']:.4g}", "-" if r["epochs"] is None else f"{r['epochs']:.0f}",
        *(str(r["params"].get(k, "-")) for k in keys), r["dvc_exp"], r["run_id"][:8],
    ] for r in rows]
    return _aligned(header, body, [False] * len(header), rule=False)


RENDERERS = {"table": render_table, "csv": render_csv, "json": render_json, "markdown": render_markdown}


def render(rows: Sequence[dict[str, Any]], fmt: str) -> str:
    """The comparison in one of FORMATS."""
    return RENDERERS[fmt](rows, differing_params(rows))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.compare",
        description="Compare the trained models in the MLflow store, best test MSE first.",
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: mlflow.experiment in params.yaml)")
    parser.add_argument("--limit", type=int, default=10, help="the best N distinct models per kind by test MSE (default 10)")
    parser.add_argument("--model", action="append", help="only this model, one of params.yaml's models (repeatable)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--study", help="the trials of this search study (python -m pipeline.search), best val loss first")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, read the runs, print the comparison; errors are one line and exit 1."""
    args = _parser().parse_args(argv)
    if args.limit < 1:
        print(f"compare: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    try:
        experiment = args.experiment or config.load().mlflow.experiment
        from pipeline import tracking

        if args.study:
            from pipeline.tracking.study import study_trials

            trials = study_rows(study_trials(experiment, args.study))
            if not trials:
                print(f"compare: no trials of study {args.study!r} in MLflow experiment {experiment!r}", file=sys.stderr)
                return 1
            sys.stdout.write(render_study(trials))
            return 0
        closed, running = tracking.running_after_cleanup(experiment, "compare")
        runs = tracking.stage_runs(experiment, "train@")
    except PipelineError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 1
    if closed or running:
        print(f"compare: closed {closed} run(s) whose process had died (now KILLED, tag closed.reason); "
              f"{running} run(s) still RUNNING are not shown", file=sys.stderr)
    rows = select(runs, args.limit, args.model or ())
    if not rows:
        print(f"compare: no finished training runs in MLflow experiment {experiment!r} at {tracking.redact(tracking.tracking_uri())}", file=sys.stderr)
    if rows or args.format in ("csv", "json"):
        sys.stdout.write(render(rows, args.format))
    return 0


if __name__ == "__main__":
    warm.exit_from("compare", main)  # in a warm server's child where one runs: MLflow, which reads the runs, loaded
