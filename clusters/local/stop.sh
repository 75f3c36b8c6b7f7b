#!/usr/bin/env bash
# Stop the Ray head and MLflow server started by clusters/local/start.sh. Idempotent.
#
# Running Ray jobs are stopped first through the job API (their drivers run in their own
# process groups, outside the head's). Then only the process groups recorded in the state
# dir are signalled: `ray stop` is not used, because it kills every Ray process on the
# machine, including other people's embedded `ray.init()` clusters.
#   CLUSTER_STATE_DIR      as for start.sh                        [<repo>/.cluster]
#   CLUSTER_VENV           as for start.sh                        [<repo>/.venv]
#   CLUSTER_STOP_TIMEOUT   seconds before SIGTERM becomes SIGKILL [30]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${CLUSTER_STATE_DIR:-$ROOT/.cluster}"
VENV="${CLUSTER_VENV:-$ROOT/.venv}"
STOP_TIMEOUT="${CLUSTER_STOP_TIMEOUT:-30}"

if [[ ! -d "$STATE_DIR" ]]; then
    echo "nothing to stop: no state dir $STATE_DIR"
    exit 0
fi
if [[ -x "$VENV/bin/python" ]]; then export PATH="$VENV/bin:$PATH"; fi

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# The pid in NAME.pid, if that process still runs the expected command; else nothing.
live_pid() {  # live_pid NAME EXPECTED_WORDS_IN_COMMAND_LINE
    local pidfile="$STATE_DIR/$1.pid" pid args
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || { echo "ignoring malformed $pidfile" >&2; return 0; }
    group_alive "$pid" || return 0
    args="$(ps -o args= -p "$pid" 2>/dev/null || true)"
    if [[ -n "$args" && "$args" != *"$2"* ]]; then
        echo "pid $pid from $pidfile is now '$args', not $1; not touching it" >&2
        return 0
    fi
    echo "$pid"
}

stop_jobs() {  # ask the head to stop its unfinished jobs (SIGTERM, then SIGKILL after 3 s)
    [[ -f "$STATE_DIR/env.sh" ]] || return 0
    (
        # shellcheck disable=SC1091
        source "$STATE_DIR/env.sh"
        python - "$RAY_API_SERVER_ADDRESS" "$STOP_TIMEOUT" <<'EOF'
import sys, time
from ray.job_submission import JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
live = [j.submission_id for j in client.list_jobs()
        if j.submission_id and not j.status.is_terminal()]
for job in live:
    print(f"stopping job {job}")
    client.stop_job(job)
deadline = time.monotonic() + float(sys.argv[2])
while live and time.monotonic() < deadline:
    time.sleep(1)
    live = [job for job in live if not client.get_job_status(job).is_terminal()]
if live:
    print(f"jobs still running: {live}", file=sys.stderr)
EOF
    ) || echo "could not stop jobs through the job API; stopping the head anyway" >&2
}

stop_group() {  # stop_group NAME PID: SIGTERM the leader, then its group, then SIGKILL
    local name="$1" pid="$2" deadline=$((SECONDS + STOP_TIMEOUT))
    echo "stopping $name (process group $pid)"
    # The leader first: `ray start --block` shuts down the Ray processes it started.
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    kill -TERM -- "-$pid" 2>/dev/null || true
    while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
    if group_alive "$pid"; then
        echo "$name did not exit within ${STOP_TIMEOUT}s; sending SIGKILL" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
}

stopped=0
ray_pid="$(live_pid ray "start --head")"
if [[ -n "$ray_pid" ]]; then
    stop_jobs
    stop_group ray "$ray_pid"
    stopped=1
fi
mlflow_pid="$(live_pid mlflow "mlflow server")"
if [[ -n "$mlflow_pid" ]]; then
    stop_group mlflow "$mlflow_pid"
    stopped=1
fi
rm -f "$STATE_DIR/ray.pid" "$STATE_DIR/mlflow.pid" "$STATE_DIR/env.sh"
if ((stopped)); then
    echo "stopped (logs and MLflow store kept in $STATE_DIR)"
else
    echo "nothing running from $STATE_DIR"
fi
