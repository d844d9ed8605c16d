#!/usr/bin/env bash
# Multi-worker training on this machine: N `tf_free.train` workers on localhost,
# one MultiWorkerMirroredStrategy cluster (a stand-in for N machines).
#
#   bash scripts/launch_local_workers.sh N [tf_free.train flags...]
#   bash scripts/launch_local_workers.sh 2 --model_dir=runs/two_workers --train_examples=4000
#
# Each worker gets TF_CONFIG {"cluster": {"worker": [localhost:P0, ...]},
# "task": {"type": "worker", "index": i}} and the same flags, plus
# --strategy=multi_worker. Worker 0 is the chief: it alone writes TensorBoard
# logs, results and the SavedModel. Output lines are prefixed with [worker i].
# Waits for all workers; if one fails, stops the others (they would wait for
# it forever) and exits non-zero. Run it inside the project's venv
# (scripts/setup.sh), or set PYTHON.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [tf_free.train flags...]   (N >= 1 workers)" >&2
  exit 2
fi
workers=$1
shift
python=${PYTHON:-python}
cd "$(dirname "$0")/.."

# Free ports, chosen by the OS.
mapfile -t ports < <("$python" - "$workers" <<'EOF'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("localhost", 0))
for s in sockets:
    print(s.getsockname()[1])
EOF
)
cluster=$(printf '"localhost:%s",' "${ports[@]}")
cluster="{\"worker\": [${cluster%,}]}"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM
for ((i = 0; i < workers; i++)); do
  TF_CONFIG="{\"cluster\": $cluster, \"task\": {\"type\": \"worker\", \"index\": $i}}" \
    "$python" -m tf_free.train --strategy=multi_worker "$@" \
    > >(sed -u "s/^/[worker $i] /") 2>&1 &
  pids+=($!)
done
echo "started ${workers} worker(s) on ports ${ports[*]} (pids ${pids[*]})" >&2

status=0
for ((left = workers; left > 0; left--)); do
  rc=0
  wait -n -p pid "${pids[@]}" || rc=$?
  if ((rc != 0)); then
    echo "worker (pid $pid) failed with exit code $rc; stopping the others" >&2
    status=$rc
    cleanup
    wait || true
    break
  fi
done
exit "$status"
