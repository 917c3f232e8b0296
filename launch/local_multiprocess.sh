#!/usr/bin/env bash
# N cxrjax processes on this machine, talking over localhost with CPU collectives
# (gloo): the multi-host code path without a cluster.
#
#   launch/local_multiprocess.sh 2 --config=configs/baseline.py:smoke --workdir=runs/mp
#
# Each process logs to WORKDIR.logs/process_<i>.log; the exit status is the
# first non-zero one. Set PYTHON to choose the interpreter (default: .venv/bin/python).
set -euo pipefail
N="${1:?usage: $0 NUM_PROCESSES ARGS...}"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PORT="${CXRJAX_COORDINATOR_PORT:-$(( 20000 + RANDOM % 20000 ))}"
LOGS="${CXRJAX_LOG_DIR:-$(mktemp -d)}"
mkdir -p "$LOGS"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo "$PY" -m cxrjax.main --distributed \
    --coordinator="localhost:$PORT" --num_processes="$N" --process_id="$i" "$@" \
    > "$LOGS/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
done
echo "logs: $LOGS" >&2
exit "$status"
