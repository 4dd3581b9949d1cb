#!/usr/bin/env bash
# The local demo: one broker and two agents on the default ports, then a few client calls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
BIN=.venv/bin
STATE=$(mktemp -d)
export XDG_STATE_HOME=$STATE
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$STATE"; }
trap cleanup EXIT

run() { echo; echo "\$ $*"; "$@"; }

$BIN/zdut-broker --log warn & pids+=($!)
$BIN/zdut-agent -a localhost:1025 -c conf/config-1.yaml --server localhost:1024 --log warn & pids+=($!)
$BIN/zdut-agent -a localhost:1026 -c conf/config-2.yaml --server localhost:1024 --log warn & pids+=($!)

# Wait (up to 10 s) until both agents have registered with the broker.
for _ in $(seq 100); do
  if $BIN/zdut list 2>/dev/null | grep -q "device2.*online" && $BIN/zdut list | grep -q "device1.*online"; then break; fi
  sleep 0.1
done

run $BIN/zdut list
run $BIN/zdut agents
run $BIN/zdut -s localhost:1025 list
run $BIN/zdut device1 status hello
echo; echo "\$ printf 'hi\\nbye now\\n' | zdut device2 repeat"
printf 'hi\nbye now\n' | $BIN/zdut device2 repeat
run $BIN/zdut -u alice device1 lock 10m
run $BIN/zdut list
run $BIN/zdut -u alice device1 unlock
echo; echo "demo finished: broker and agents stopped"
