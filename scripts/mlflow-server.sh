#!/usr/bin/env bash
# A shared MLflow tracking server for the team: database backend store, artifacts
# proxied through the server (clients need no access to the artifact folder/bucket),
# bound to 127.0.0.1 unless HOST says otherwise, optional basic auth.
#
#   scripts/mlflow-server.sh                 # SQLite + ./.mlflow-server/artifacts on 127.0.0.1:5001
#   scripts/mlflow-server.sh --auth          # the same behind MLflow's basic-auth app
#   scripts/mlflow-server.sh -- --workers 8  # anything after `--` goes to `mlflow server`
#
# Settings (environment variables; defaults in brackets):
#   HOST                    interface to bind [127.0.0.1]; 0.0.0.0 exposes it to the network:
#                           then use --auth, and ALLOWED_HOSTS if clients use a DNS name
#   PORT                    [5001] (the UI of `./tasks.sh ui` has 5000, `./tasks.sh serve` 5002);
#                           a taken port is one line and exit 2 before anything starts
#   SERVER_DIR              where the default store and artifacts live [./.mlflow-server]
#   BACKEND_STORE_URI       runs, params, metrics [sqlite:///$SERVER_DIR/mlflow.db];
#                           a team: postgresql://USER:PASSWORD@DBHOST:5432/DBNAME (docs/team.md)
#   ARTIFACTS_DESTINATION   where proxied artifacts are stored [$SERVER_DIR/artifacts];
#                           or s3://bucket/prefix (needs boto3 and AWS_* credentials on the server only)
#   WORKERS                 uvicorn worker processes [2]
#   ALLOWED_HOSTS           Host headers accepted, comma separated (MLflow's default: localhost
#                           and private IPs); e.g. mlflow.team.example,mlflow.team.example:5001
# With --auth, also:
#   MLFLOW_FLASK_SERVER_SECRET_KEY  required: signs the UI's CSRF tokens (same value on every replica)
#   MLFLOW_AUTH_ADMIN_PASSWORD      required on the first start only: creates the admin user
#   MLFLOW_AUTH_ADMIN_USERNAME      [admin]
#   MLFLOW_AUTH_CONFIG_PATH         an auth .ini of your own; by default one is written to
#                                   $SERVER_DIR/basic_auth.ini with the user db next to it
#   AUTH_CACHE_SECONDS              how long a worker trusts a password it checked [60]; 0: check
#                                   every request (MLflow's default: a password hash, 0.27 s of CPU
#                                   per request here, against 0.01 s cached; docs/team.md)
# Clients then set MLFLOW_TRACKING_URI=http://HOST:PORT, and with --auth also
# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (sent as HTTP basic auth).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/mlflow ]] && export PATH="$PWD/.venv/bin:$PATH"  # the project's mlflow, as tasks.sh installs it
PY="$(command -v python || command -v python3)"

auth=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --auth) auth=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "mlflow-server.sh: unknown option '$1'; allowed: --auth, --help, -- <mlflow server options>" >&2; exit 2 ;;
  esac
done

HOST="${HOST:-127.0.0.1}"
PORT="$("$PY" -m pipeline.ports check server --host "$HOST")" || exit 2  # one line when taken, before anything starts

SERVER_DIR="$(mkdir -p "${SERVER_DIR:-.mlflow-server}" && cd "${SERVER_DIR:-.mlflow-server}" && pwd)"
BACKEND_STORE_URI="${BACKEND_STORE_URI:-sqlite:///$SERVER_DIR/mlflow.db}"
ARTIFACTS_DESTINATION="${ARTIFACTS_DESTINATION:-$SERVER_DIR/artifacts}"
# MLflow's background job workers (GenAI jobs) are not used here and outlive a plain kill.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(
  --backend-store-uri "$BACKEND_STORE_URI"
  --serve-artifacts --artifacts-destination "$ARTIFACTS_DESTINATION"
  --host "$HOST" --port "$PORT" --workers "${WORKERS:-2}"
)
[[ -n "${ALLOWED_HOSTS:-}" ]] && args+=(--allowed-hosts "$ALLOWED_HOSTS")

if (( auth )); then
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    echo "mlflow-server.sh: --auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (any long random string, e.g. \$(openssl rand -hex 32))" >&2
    exit 2
  fi
  if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
    export MLFLOW_AUTH_CONFIG_PATH="$SERVER_DIR/basic_auth.ini"
    cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
# Users who are not granted a permission on an experiment may read it.
default_permission = READ
database_uri = sqlite:///$SERVER_DIR/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${AUTH_CACHE_SECONDS:-60}
INI
  fi
  args+=(--app-name basic-auth)
fi

"$PY" -m pipeline.ports announce server --host "$HOST" --port "$PORT" --pid $$  # prints the URL once it answers
exec mlflow server "${args[@]}" "$@"
