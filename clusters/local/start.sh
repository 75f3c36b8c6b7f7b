#!/usr/bin/env bash
# Start a local Ray head (token auth) and an MLflow tracking server, both on 127.0.0.1.
#
#   clusters/local/start.sh            # then paste the printed `export` lines
#   clusters/local/stop.sh             # stops both (idempotent)
#
# Settings (environment variables, defaults in brackets):
#   CLUSTER_STATE_DIR       pids, logs, env.sh, MLflow store        [<repo>/.cluster]
#   CLUSTER_VENV            venv whose bin/ goes first on PATH      [<repo>/.venv]
#   CLUSTER_RAY_PORT        GCS port                                [6379]
#   CLUSTER_DASHBOARD_PORT  dashboard / job submission API          [8265]
#   CLUSTER_CLIENT_PORT     Ray client server                       [10001]
#   CLUSTER_AGENT_PORT      dashboard agent HTTP port               [52365]
#   CLUSTER_MLFLOW_PORT     MLflow tracking server                  [5000]
#   CLUSTER_RAY_TEMP_DIR    Ray session/log dir                     [/tmp/ray-ga-<CLUSTER_RAY_PORT>]
#   CLUSTER_NUM_CPUS        CPUs the head offers                    [all]
#   CLUSTER_START_TIMEOUT   seconds to wait for each service        [180]
#   RAY_AUTH_TOKEN_PATH     token file; created if missing          [Ray's ~/.ray/auth_token]
#
# Jobs submitted to this head inherit its environment: the venv's `python` first on PATH,
# RAY_AUTH_MODE=token and MLFLOW_TRACKING_URI pointing at the MLflow server started here.
# Ray keeps its address file in its own temp dir, so an embedded `ray.init()` elsewhere on
# this machine does not silently join this cluster.
set -euo pipefail

HOST=127.0.0.1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${CLUSTER_STATE_DIR:-$ROOT/.cluster}"
VENV="${CLUSTER_VENV:-$ROOT/.venv}"
RAY_PORT="${CLUSTER_RAY_PORT:-6379}"
DASHBOARD_PORT="${CLUSTER_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${CLUSTER_CLIENT_PORT:-10001}"
AGENT_PORT="${CLUSTER_AGENT_PORT:-52365}"
MLFLOW_PORT="${CLUSTER_MLFLOW_PORT:-5000}"
RAY_TEMP_DIR="${CLUSTER_RAY_TEMP_DIR:-/tmp/ray-ga-$RAY_PORT}"
START_TIMEOUT="${CLUSTER_START_TIMEOUT:-180}"

die() { echo "clusters/local/start.sh: $*" >&2; exit 1; }

mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"

if [[ -x "$VENV/bin/ray" ]]; then
    export PATH="$VENV/bin:$PATH"
fi
command -v ray >/dev/null || die "'ray' not found (looked in $VENV/bin and on PATH); run 'make venv' first"
command -v mlflow >/dev/null || die "'mlflow' not found (looked in $VENV/bin and on PATH)"
PYTHON="$(command -v python)" || die "'python' not found (looked in $VENV/bin and on PATH)"

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$STATE_DIR/ray.pid" || alive "$STATE_DIR/mlflow.pid"; then
    die "a cluster from $STATE_DIR is already running; run clusters/local/stop.sh first"
fi

for port in "$RAY_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$AGENT_PORT" "$MLFLOW_PORT"; do
    # As the servers will bind: on all interfaces (Ray's GCS listens on every address) and
    # with SO_REUSEADDR (a port left in TIME_WAIT by a stopped server is free to reuse).
    "$PYTHON" - "$port" <<'EOF' || die "port $port is already in use (set the CLUSTER_*_PORT variables)"
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", int(sys.argv[1])))
    except OSError:
        sys.exit(1)  # the one line is die's
EOF
done

# Token auth: Ray reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH,
# else ~/.ray/auth_token. `ray get-auth-token --generate` only ever writes the default file,
# so a custom RAY_AUTH_TOKEN_PATH is filled here with a token of the same form (256-bit hex).
export RAY_AUTH_MODE=token
if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
        mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
        (umask 077 && "$PYTHON" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' \
            >"$RAY_AUTH_TOKEN_PATH.tmp" && mv "$RAY_AUTH_TOKEN_PATH.tmp" "$RAY_AUTH_TOKEN_PATH")
    fi
    export RAY_AUTH_TOKEN_PATH
elif [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    ray get-auth-token --generate >/dev/null 2>&1 || die "ray get-auth-token --generate failed"
fi
ray get-auth-token >/dev/null 2>&1 || die "Ray cannot read its auth token (RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-unset})"

MLFLOW_URI="http://$HOST:$MLFLOW_PORT"
DASHBOARD_URL="http://$HOST:$DASHBOARD_PORT"
GCS_ADDRESS="$HOST:$RAY_PORT"
export MLFLOW_TRACKING_URI="$MLFLOW_URI"
# Absolute values only: env.sh works sourced from any directory. The venv's bin/ goes first on
# PATH (`ray job submit` is the venv's); the submitting side skips .gitignore files (Ray would
# log a line for each it reads): clusters/runtime_env.yaml's excludes list what to leave out.
{
    if [[ -x "$VENV/bin/ray" ]]; then echo "export PATH=$VENV/bin:\$PATH"; fi
    echo "export RAY_ADDRESS=$GCS_ADDRESS"
    echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL"
    echo "export RAY_AUTH_MODE=token"
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URI"
    echo "export RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1"
} >"$STATE_DIR/env.sh"

on_error() {
    echo "clusters/local/start.sh: start failed; logs in $STATE_DIR; stopping what was started" >&2
    CLUSTER_STATE_DIR="$STATE_DIR" CLUSTER_VENV="$VENV" "$ROOT/clusters/local/stop.sh" >&2 || true
}
trap on_error ERR

wait_until() {  # wait_until DESCRIPTION PIDFILE COMMAND...
    local what="$1" pidfile="$2"; shift 2
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        alive "$pidfile" || { echo "$what exited during start-up; see its log in $STATE_DIR" >&2; return 1; }
        ((SECONDS < deadline)) || { echo "$what not ready after ${START_TIMEOUT}s" >&2; return 1; }
        sleep 1
    done
}

# MLflow: SQLite backend and served artifacts, both under the state dir. Each service runs
# in its own session (setsid), so stop.sh can signal exactly its process group.
mkdir -p "$STATE_DIR/mlartifacts"
setsid mlflow server \
    --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
    --artifacts-destination "$STATE_DIR/mlartifacts" \
    >"$STATE_DIR/mlflow.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/mlflow.pid"
wait_until "mlflow server" "$STATE_DIR/mlflow.pid" curl -sf "$MLFLOW_URI/health"

# Ray head: --block keeps `ray start` in the foreground of its session; on SIGTERM it shuts
# down the GCS, raylet and dashboard it started (and they take their workers with them).
# Draining on SIGTERM (a grace period for Ray Serve replicas, 30 s by default) has nothing
# to hand over to on a one-node cluster, so it is turned off.
# The dashboard (job API) listens on 127.0.0.1 only. Ray binds the GCS, raylet and object
# manager to the node's own address whatever it is told (it maps 127.0.0.1 to that address),
# so those ports are guarded by the token, not by the bind address.
num_cpus_args=()
if [[ -n "${CLUSTER_NUM_CPUS:-}" ]]; then num_cpus_args=(--num-cpus "$CLUSTER_NUM_CPUS"); fi
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid ray start --head --block --disable-usage-stats \
    --port "$RAY_PORT" \
    --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
    --temp-dir "$RAY_TEMP_DIR" "${num_cpus_args[@]}" \
    >"$STATE_DIR/ray.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/ray.pid"
wait_until "ray head" "$STATE_DIR/ray.pid" ray job list --address "$DASHBOARD_URL"

trap - ERR

cat <<EOF
Ray head:      $GCS_ADDRESS (dashboard and job API: $DASHBOARD_URL), python: $PYTHON
MLflow server: $MLFLOW_URI (store: $STATE_DIR/mlflow.db)
State and logs: $STATE_DIR

Set up your shell (or: source $STATE_DIR/env.sh):
$(cat "$STATE_DIR/env.sh")

Submit the pipeline:
  ray job submit --address $DASHBOARD_URL --working-dir . --runtime-env clusters/runtime_env.yaml \\
      -- python -m pipeline full --workdir "\$PWD/runs/cluster"

Stop: clusters/local/stop.sh
EOF
