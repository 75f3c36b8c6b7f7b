#!/usr/bin/env bash
# Stop the Ray head and MLflow server started by clusters/local/start.sh. Idempotent.
#
# Only the process groups recorded in the state dir are signalled: `ray stop` is not used,
# because it would kill every Ray process on the machine (other users' embedded Ray too).
#   CLUSTER_STATE_DIR      as for start.sh                       [<repo>/.cluster]
#   CLUSTER_STOP_TIMEOUT   seconds before SIGTERM becomes SIGKILL [30]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${CLUSTER_STATE_DIR:-$ROOT/.cluster}"
STOP_TIMEOUT="${CLUSTER_STOP_TIMEOUT:-30}"

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

stop_service() {  # stop_service NAME EXPECTED_WORDS_IN_COMMAND_LINE
    local name="$1" expected="$2" pidfile="$STATE_DIR/$1.pid" pid args
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if ! [[ "$pid" =~ ^[0-9]+$ ]]; then
        echo "ignoring malformed $pidfile" >&2
        rm -f "$pidfile"
        return 0
    fi
    # start.sh ran each service as a session leader (setsid), so its pid is its group id.
    if group_alive "$pid"; then
        args="$(ps -o args= -p "$pid" 2>/dev/null || true)"
        if [[ -n "$args" && "$args" != *"$expected"* ]]; then
            echo "pid $pid from $pidfile is now '$args', not $name; not touching it" >&2
            rm -f "$pidfile"
            return 0
        fi
        echo "stopping $name (process group $pid)"
        # The leader first: `ray start --block` shuts its Ray processes down on SIGTERM.
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
        kill -TERM -- "-$pid" 2>/dev/null || true
        while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
        if group_alive "$pid"; then
            echo "$name did not exit within ${STOP_TIMEOUT}s; sending SIGKILL" >&2
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

if [[ ! -d "$STATE_DIR" ]]; then
    echo "nothing to stop: no state dir $STATE_DIR"
    exit 0
fi
stop_service ray "start --head"
stop_service mlflow "mlflow server"
rm -f "$STATE_DIR/env.sh"
echo "stopped (logs and MLflow store kept in $STATE_DIR)"
