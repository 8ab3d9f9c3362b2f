#!/usr/bin/env bash
# One entry point for the project's commands; each installs what it needs first.
# `./tasks.sh` alone lists them; `./tasks.sh <command> --help` says more about one.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="${PYTHON:-python3}"

usage() {
  cat <<'EOF'
usage: ./tasks.sh <command> [arguments]
  install   install the project and its tools into .venv (done by every command below when needed)
  repro     install, then `dvc repro` (the whole pipeline); arguments go to dvc repro
  test      install, then run the test suite; arguments go to pytest (e.g. -m "not slow")
  warm      start the warm stage server (stages start in a second); `warm stop` stops it, `warm status` shows it
  ui        the MLflow UI on the workspace's mlflow.db at http://127.0.0.1:5000 (PORT to change)
  compare   table of the trained models, best test MSE first (--format csv|json|markdown, --limit N, --study S)
  search    an Optuna search over params.yaml's search: space, each trial a DVC experiment (--trials, --jobs)
  server    a shared MLflow tracking server at http://127.0.0.1:5001 (PORT, HOST; see server --help)
  serve     serve models:/regression-<model>@champion (default: the last of params.yaml's models) at http://127.0.0.1:5002 (PORT to change)
  bench     run the benchmark; figures and their meaning in bench/RESULTS.md
  sync      replay runs spooled while MLflow was down (--upgrade-store: back up, then migrate mlflow.db)
EOF
}

help_line() {
  # `./tasks.sh <command> --help` for the commands tasks.sh runs itself: their line of the table.
  usage | sed -n '1p'
  usage | grep -E "^  $1 "
}

warm_up() {
  # The warm stage server for the command's stages (pipeline/warm.py): one line on stderr; PIPELINE_WARM=0: none.
  (( help )) || [[ "${PIPELINE_WARM:-1}" == 0 ]] || python -m pipeline.warm start >&2 || true
}

check_port() {
  # Fail in one line (exit 2) before installing or starting anything when the command's port is taken.
  "$PY" -m pipeline.ports check "$@" || exit 2
}

pip_quietly() {
  # pip in .venv, its output on stderr without its per-lookup warnings about index locations; pip's exit status.
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep --line-buffered -v -E '^WARNING: Location .* is ignored' || true; } >&2
}

make_venv() {
  # A venv with a working pip; a half-made one (e.g. from an interrupted run) is made again.
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 && return
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian/Ubuntu's Python lacks ensurepip unless python3-venv is installed: use virtualenv from PyPI instead.
    rm -rf "$VENV"
    local tool
    tool="$(mktemp -d)"
    "$PY" -m pip install --quiet --target "$tool" virtualenv
    PYTHONPATH="$tool" "$PY" -m virtualenv --quiet "$VENV"
    rm -rf "$tool"
  fi
}

install() {
  # Reinstall only when pyproject.toml changed since the last install.
  local stamp="$VENV/.installed-$(cksum < pyproject.toml | cut -d' ' -f1)"
  if [[ ! -f "$stamp" ]]; then
    local start=$SECONDS
    echo "tasks.sh install: installing the project into $VENV (first run, or pyproject.toml changed)" >&2
    echo "tasks.sh install: [1/3] creating $VENV" >&2
    make_venv
    echo "tasks.sh install: [2/3] upgrading pip" >&2
    pip_quietly install --quiet --upgrade pip
    echo "tasks.sh install: [3/3] installing torch, mlflow, dvc and the project: a few minutes on a fresh machine" >&2
    if ! pip_quietly install -e '.[dev]'; then  # pip's own progress: a line per package
      echo "tasks.sh install: pip failed (its messages are above)" >&2
      exit 1
    fi
    rm -f "$VENV"/.installed-*
    touch "$stamp"
    echo "tasks.sh install: done in $((SECONDS - start)) s" >&2
  fi
  export PATH="$PWD/$VENV/bin:$PATH"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
help=0
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && help=1
if (( help )) && [[ "$cmd" == install || "$cmd" == ui ]]; then
  help_line "$cmd"  # the other commands pass --help to the tool they run
  exit 0
fi

case "$cmd" in
  install) [[ $# -eq 0 ]] || { echo "tasks.sh install: takes no arguments, got: $*" >&2; exit 2; }; install ;;
  repro)   install; warm_up; dvc repro "$@" ;;
  test)    install; warm_up; python -m pytest "$@" ;;
  warm)    install; exec python -m pipeline.warm "$@" ;;
  ui)
    [[ $# -eq 0 ]] || { echo "tasks.sh ui: takes no arguments (PORT picks the port), got: $*" >&2; exit 2; }
    port="$(check_port ui)"
    install
    python -m pipeline.ports announce ui --port "$port" --pid $$
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec mlflow ui --backend-store-uri "sqlite:///$PWD/mlflow.db" \
      --host 127.0.0.1 --port "$port" --workers 1 ;;
  bench)   install; python -m bench "$@" ;;
  compare) install; python -m pipeline.compare "$@" ;;
  search)  install; warm_up; python -m pipeline.search "$@" ;;
  server)  (( help )) || check_port server --host "${HOST:-127.0.0.1}" >/dev/null; install; exec scripts/mlflow-server.sh "$@" ;;
  sync)    install; exec python -m pipeline.warm run sync "$@" ;;  # in a warm server's child when one runs
  serve)   (( help )) || check_port serve >/dev/null; install; exec python -m pipeline.serve "$@" ;;
  *)
    [[ -n "$cmd" ]] && echo "tasks.sh: unknown command '$cmd'" >&2
    usage >&2
    exit 2 ;;
esac
