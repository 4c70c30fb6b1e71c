#!/usr/bin/env bash
# Interleaved before/after runs of `herald bench fanout`: one fresh server
# per run, the order of the two binaries alternating between rounds, one
# `summary` line per run (prefixed A or B) appended to $OUT.
#
#   bench/ab.sh BASE_BINARY NEW_BINARY [ROUNDS]
#
# Loopback only; each run is bounded (1000 subscribers, 1000 messages).
set -u
A=$1 B=$2 ROUNDS=${3:-4}
OUT=${OUT:-bench/ab-results.txt}
ulimit -n 20000
run() { # label binary args...
  local label=$1 bin=$2; shift 2
  local dir; dir=$(mktemp -d)
  "$bin" serve --http 127.0.0.1:0 --mqtt 127.0.0.1:0 --data "$dir/data" > "$dir/out" 2> "$dir/err" &
  local pid=$!
  for _ in $(seq 50); do [ "$(wc -l < "$dir/out")" -ge 2 ] && break; sleep 0.1; done
  local http mqtt
  http=$(sed -n 1p "$dir/out" | sed 's/herald listening on //')
  mqtt=$(sed -n 2p "$dir/out" | sed 's/herald mqtt listening on //')
  echo "$label $("$B" bench "$@" --server "$http" --mqtt "$mqtt" --pid "$pid" 2>/dev/null | grep '^summary')" | tee -a "$OUT"
  kill "$pid"; wait "$pid" 2>/dev/null; rm -rf "$dir"
}
for round in $(seq "$ROUNDS"); do
  for w in "--transport sse --messages 1000" "--transport ws --messages 1000" \
           "--transport longpoll --messages 300" "--transport mqtt0 --messages 1000"; do
    # shellcheck disable=SC2086
    if [ $((round % 2)) = 1 ]; then run A "$A" fanout --subscribers 1000 $w; run B "$B" fanout --subscribers 1000 $w
    else run B "$B" fanout --subscribers 1000 $w; run A "$A" fanout --subscribers 1000 $w; fi
  done
done
