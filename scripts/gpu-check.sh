#!/usr/bin/env bash
# The one command to run on a GPU machine: prepares what it lacks, then checks every GPU path end to end.
#   scripts/gpu-check.sh        logs in $GPU_CHECK_LOGS (default gpu-check-logs/), a summary on stdout
# Steps, each under its own time limit (about 7 minutes in all); a failed step does not stop the next ones:
#   prepare  torch must be there; MLflow, DVC and pytest-xdist from .whl/ on an offline machine (docs/gpu.md
#            says how to fill it), else ./tasks.sh install
#   tests    the GPU tests: python -m pytest -m "gpu and not slow" (CUDA graphs against the eager loop)
#   repro    one cold `dvc repro`, default params with device auto and cuda_graph on, in a throwaway copy:
#            stderr must be quiet, and train@linear and train@mlp must have replayed CUDA graphs
#   models   every model that repro logged, through mlflow.pyfunc, pipeline.tracking.load_torch_module
#            and `mlflow models serve`, against the stage's own weights on test rows
#   bench    python -m bench --only gpu,live: CUDA loop vs bare eager CUDA loop, vs this CPU, and at 1M rows;
#            live logging + system metrics (GPU through nvidia-ml-py) on / off, on the CPU and on CUDA
# Exit status: 0 when every step passed. GPU_CHECK_ALLOW_CPU=1 runs it without CUDA (to try the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOGS=$(mkdir -p "${GPU_CHECK_LOGS:-gpu-check-logs}" && cd "${GPU_CHECK_LOGS:-gpu-check-logs}" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}  # GPU_CHECK_WORK: keep the throwaway project there
export ROOT LOGS WORK
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME LIMIT_S COMMAND...: run under a time limit, log to $LOGS/NAME.log, record the outcome
  local name=$1 limit=$2 start rc
  shift 2
  start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if [[ $(type -t "$1") == function ]]; then  # a function of this script: run it in a child bash that has it
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $*" >"$LOGS/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  fi
  rc=$?
  local took=$((SECONDS - start)) verdict=ok
  if ((rc == 124 || rc == 137)); then verdict="TIMED OUT"; elif ((rc != 0)); then verdict="FAILED (exit $rc)"; fi
  [[ $verdict == ok ]] || FAILED=1
  SUMMARY+=("$(printf '%-8s %-18s %4ss' "$name" "$verdict" "$took")")
  tail -n "${TAIL:-25}" "$LOGS/$name.log"
}

prepare() {
  if [[ ! -x .venv/bin/python && -d .whl ]] && python3 -c "import torch" 2>/dev/null; then
    # an offline GPU image: its own torch, with MLflow and DVC from the wheels
    timeout 120 python3 -m pip install -q --no-index --no-deps --upgrade --target "$WORK/site" .whl/*.whl || return 1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"
  else
    timeout 600 ./tasks.sh install || return 1
    export PATH="$ROOT/.venv/bin:$PATH"
  fi
  python3 -c "import xdist" 2>/dev/null || { echo "pytest-xdist is missing (pyproject's addopts run the tests with -n): put its wheel in .whl/ (docs/gpu.md)"; return 1; }
  command -v python >/dev/null || { mkdir -p "$WORK/bin"; ln -s "$(command -v python3)" "$WORK/bin/python"; export PATH="$WORK/bin:$PATH"; }
  export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-$WORK/pycache}"  # packages without .pyc compile once, not per stage
  export DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
  export GIT_AUTHOR_NAME="${GIT_AUTHOR_NAME:-gpu-check}" GIT_AUTHOR_EMAIL="${GIT_AUTHOR_EMAIL:-gpu-check@example.invalid}"
  export GIT_COMMITTER_NAME="$GIT_AUTHOR_NAME" GIT_COMMITTER_EMAIL="$GIT_AUTHOR_EMAIL"
  if ! git rev-parse --git-dir >/dev/null 2>&1; then  # a copied tree: the throwaway copies are made from git's file list
    git init -q -b main && echo "/.whl/" >>.git/info/exclude && git add -A && git commit -qm "gpu-check snapshot"
  fi
  python -c "import torch, mlflow, dvc.version as v; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), \
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', '| mlflow', mlflow.__version__, '| dvc', v.__version__)"
  [[ -n ${GPU_CHECK_ALLOW_CPU:-} ]] ||
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')"
}

repro() {
  python -c "import sys; from pathlib import Path; from bench.workspace import copy_project; copy_project(Path(sys.argv[1]), {'device': 'auto', 'cuda_graph': True})" "$WORK/repo" || return 1
  cd "$WORK/repo" || return 1
  local start=$SECONDS
  dvc repro 2>"$LOGS/repro.stderr" || { cat "$LOGS/repro.stderr"; return 1; }
  echo "cold dvc repro: $((SECONDS - start)) s"
  python -m pipeline.compare
  dvc metrics show metrics/evaluation
  if grep -Eiq "warn|traceback|error" "$LOGS/repro.stderr"; then echo "stderr was not quiet:"; cat "$LOGS/repro.stderr"; return 1; fi
  echo "stderr: quiet ($(wc -c <"$LOGS/repro.stderr") bytes)"
  python - <<'PY'  # where each model trained, and how: linear and mlp on CUDA must have replayed graphs
import os
import sys

from mlflow import MlflowClient

client = MlflowClient("sqlite:///mlflow.db")
runs = client.search_runs([client.get_experiment_by_name("regression").experiment_id], "tags.stage LIKE 'train@%'")
tags = {r.data.tags["stage"]: r.data.tags for r in runs}
for stage, t in sorted(tags.items()):
    print(f"{stage}: device {t.get('device')}, loop {t.get('training.loop')}")
graphed = all(tags[f"train@{m}"].get("training.loop") == "cuda_graph" for m in ("linear", "mlp"))
if not graphed and not os.environ.get("GPU_CHECK_ALLOW_CPU"):
    sys.exit("train@linear and train@mlp did not both replay CUDA graphs")
PY
}

models() {
  [[ -f "$WORK/repo/mlflow.db" ]] || { echo "no repro to read (the repro step failed)"; return 1; }
  # the tests' own helper, imported as pytest imports it (tests/ and the root on the path)
  PYTHONPATH="$ROOT/tests:$ROOT${PYTHONPATH:+:$PYTHONPATH}" python - "$WORK/repo" "$LOGS" <<'PY'
import sys
from pathlib import Path

from tests.helpers import check_logged_models

check_logged_models(Path(sys.argv[1]), Path(sys.argv[2]))
print("every logged model loads through pyfunc and as an nn.Module; train@mlp's serves the same predictions over REST")
PY
}

echo "== prepare"  # in this shell, not under `step`: what it exports is what the other steps run with
start=$SECONDS
if prepare >"$LOGS/prepare.log" 2>&1; then verdict=ok; else verdict=FAILED; FAILED=1; fi
tail -n 5 "$LOGS/prepare.log"
SUMMARY+=("$(printf '%-8s %-18s %4ss' prepare "$verdict" "$((SECONDS - start))")")
if [[ $verdict == ok ]]; then
  step tests 40 python -m pytest -q -n 0 -m "gpu and not slow" -p no:cacheprovider
  step repro 180 repro
  step models 60 models
  step bench 150 python -m bench --only gpu,live
fi
echo
echo "gpu-check summary (logs in $LOGS):"
printf '  %s\n' "${SUMMARY[@]}"
[[ -n ${GPU_CHECK_WORK:-} ]] || rm -rf "$WORK"
exit $FAILED
