#!/usr/bin/env bash
# What the guards cost: two release builds of herald, interleaved run by run
# on fresh servers, on the same workloads: idle memory per connection
# (`herald bench idle`, 10,000 connections) and server CPU per delivery
# (`herald bench fanout`, 1,000 subscribers x 1,000 messages).
#
#   bench/guards.sh BEFORE_BIN AFTER_BIN [RUNS]
#
# Each binary is measured as configured by default (loopback is exempt, as
# `herald bench` connects from it) and AFTER_BIN also with every guard active
# on every connection (no exempt address, each connection counted per
# address; limits high enough that the load itself is never refused), which
# is what a counted connection on a public server costs.
# Loopback only; bounded by the counts and --timeout.
set -uo pipefail  # a failed run is reported and the next goes on
before=${1:?before binary}
after=${2:?after binary}
runs=${3:-2}
ulimit -n 20000
work=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$work"' EXIT

# All guards on, none refusing this load.
ACTIVE=(HERALD_LIMITS_EXEMPT= HERALD_LIMITS_REQUESTS_RATE=0 HERALD_LIMITS_CONNECTIONS_PER_IP=50000
  HERALD_LIMITS_CONNECTIONS_RATE_PER_IP=0 HERALD_LIMITS_CONNECTIONS_PER_USER=50000
  HERALD_LIMITS_PUBLISH_PER_CONNECTION=0 HERALD_LIMITS_PUBLISH_PER_USER=0)

# serve BIN LABEL [ENV...]: starts a fresh server; sets PID, HTTP, MQTT.
serve() {
  local bin=$1 label=$2
  shift 2
  rm -rf "$work/data" "$work/out"
  env "$@" HERALD_LOG=warn "$bin" serve --http 127.0.0.1:0 --mqtt 127.0.0.1:0 --data "$work/data" >"$work/out" 2>"$work/err" &
  PID=$!
  # (The redirection above happens in the background job: the file is
  # removed first so an old server's lines are never read.)
  for _ in $(seq 300); do
    grep -q "mqtt listening" "$work/out" 2>/dev/null && break
    sleep 0.1
  done
  HTTP=$(sed -n 's/^herald listening on //p' "$work/out")
  MQTT=$(sed -n 's/^herald mqtt listening on //p' "$work/out")
  echo "== $label ($bin, pid $PID)"
}

stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }

measure() {
  local bin=$1 label=$2
  shift 2
  for t in sse ws mqtt0; do
    serve "$bin" "$label" "$@"
    echo "-- idle $t"
    "$after" bench idle --transport "$t" --connections 10000 --server "$HTTP" --mqtt "$MQTT" --pid "$PID" |
      grep -E "memory per conn|server rss"
    stop
  done
  for t in sse ws mqtt0; do
    serve "$bin" "$label" "$@"
    echo "-- fanout $t"
    "$after" bench fanout --transport "$t" --subscribers 1000 --messages 1000 --timeout 180 \
      --server "$HTTP" --mqtt "$MQTT" --pid "$PID" | grep -E "server cpu|^deliveries|^lost|latency p99"
    stop
  done
}

for run in $(seq "$runs"); do
  echo "#### run $run"
  measure "$before" before
  measure "$after" after
  measure "$after" "after, guards active" "${ACTIVE[@]}"
done
