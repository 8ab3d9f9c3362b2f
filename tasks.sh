#!/usr/bin/env bash
# One entry point for the project's commands; each installs what it needs first.
#   ./tasks.sh repro     install into .venv, then `dvc repro` (the whole pipeline)
#   ./tasks.sh test      install into .venv, then run the test suite
#   ./tasks.sh ui        open the MLflow UI on the embedded store (127.0.0.1:5000)
#   ./tasks.sh search    Optuna search over params.yaml's search: space, each trial a DVC experiment (--trials, --jobs)
#   ./tasks.sh compare   table of the latest trained models, best test MSE first (--format csv|json|markdown)
#   ./tasks.sh server    a shared MLflow tracking server (scripts/mlflow-server.sh --help)
#   ./tasks.sh serve     serve models:/regression-<model>@champion (default mlp) on 127.0.0.1:${PORT:-5000}
#   ./tasks.sh bench     run the benchmark; figures and their meaning in bench/RESULTS.md
#   ./tasks.sh sync      replay runs spooled while MLflow was down (--upgrade-store: back up, then migrate mlflow.db)
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="${PYTHON:-python3}"

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
    make_venv
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
  export PATH="$PWD/$VENV/bin:$PATH"
}

case "${1:-}" in
  install) install ;;
  repro)   install; shift; dvc repro "$@" ;;
  test)    install; shift; python -m pytest "$@" ;;
  ui)      install; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec mlflow ui --backend-store-uri "sqlite:///$PWD/mlflow.db" --host 127.0.0.1 --port "${PORT:-5000}" --workers 1 ;;
  bench)   install; shift; python -m bench "$@" ;;
  compare) install; shift; python -m pipeline.compare "$@" ;;
  search)  install; shift; python -m pipeline.search "$@" ;;
  server)  install; shift; exec scripts/mlflow-server.sh "$@" ;;
  sync)    install; shift; python -m pipeline.sync "$@" ;;
  serve)   install; shift; exec python -m pipeline.serve "$@" ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
