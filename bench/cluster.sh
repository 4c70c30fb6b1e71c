#!/usr/bin/env bash
# Herald over Redis, measured on loopback in one run, beside the single SQLite
# node and beside Nchan in its Redis mode:
#   1. acknowledged publishes per second (HTTP, 64 publishers), with the CPU
#      each process spends per publish: the publishing node, the other node
#      (it receives every message on its feed), Redis;
#   2. a burst to 1,000 SSE subscribers on another node than the publisher:
#      CPU per delivery and latency, and the same on one SQLite node;
#   3. latency at a steady rate across nodes;
#   4. Redis killed (kill -9) and restarted (AOF, appendfsync always) while a
#      publisher on one node sends at a steady rate to subscribers on another,
#      retrying refused publishes: what each system lost, delivered twice or
#      out of order. Herald's publisher sends an Idempotency-Key; Nchan has none;
#   5. what two idle nodes cost: CPU of Redis and of a node with no traffic.
# Writes a markdown report (default bench/cluster-results.md) and the raw
# outputs beside it.
#
# Knobs: PUBS=64 PUB_MSGS=30000 SUBS=1000 MSGS=1000 LAT_MSGS=200 RATE=20
#        CHAOS_SUBS=200 CHAOS_MSGS=3000 CHAOS_RATE=300 BUILD=1
# Every server is started here on its own ports and stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${1:-bench/cluster-results.md}
raw=${out%.md}-raw.txt
PUBS=${PUBS:-64} PUB_MSGS=${PUB_MSGS:-30000}
SUBS=${SUBS:-1000} MSGS=${MSGS:-1000} LAT_MSGS=${LAT_MSGS:-200} RATE=${RATE:-20}
CHAOS_SUBS=${CHAOS_SUBS:-200} CHAOS_MSGS=${CHAOS_MSGS:-3000} CHAOS_RATE=${CHAOS_RATE:-300}
BUILD=${BUILD:-1}
REDIS_PORT=16390 SINGLE=18100 NODE_A=18101 NODE_B=18102 NCHAN_A=18121 NCHAN_B=18122

ulimit -n 20000
bin=$repo/target/release/herald
for p in redis-server nginx; do command -v $p >/dev/null || { echo "needs $p" >&2; exit 1; }; done
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || apt-get install -y -qq libnginx-mod-nchan >/dev/null
if [ "$BUILD" = 1 ]; then cargo build --release -p herald; fi

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}
stop() { [ -n "${1:-}" ] || return 0; kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

redis_pid='' a_pid='' b_pid='' single_pid='' na_pid='' nb_pid=''
start_redis() { # start_redis [redis-server args]: a fresh Redis
  stop "$redis_pid"
  local dir
  dir=$(mktemp -d -p "$tmp" redis.XXXX)
  redis-server --port $REDIS_PORT --bind 127.0.0.1 --dir "$dir" --save '' --maxmemory-policy noeviction \
    --appendonly yes --appendfsync always "$@" >>"$tmp/redis.log" 2>&1 &
  redis_pid=$!
  pids+=($redis_pid)
  wait_port $REDIS_PORT
  REDIS_DIR=$dir
}
restart_redis() { # kill -9, then start on the same data
  kill -9 "$redis_pid"
  wait "$redis_pid" 2>/dev/null || true
  redis-server --port $REDIS_PORT --bind 127.0.0.1 --dir "$REDIS_DIR" --save '' --maxmemory-policy noeviction \
    --appendonly yes --appendfsync always >>"$tmp/redis.log" 2>&1 &
  redis_pid=$!
  pids+=($redis_pid)
}
start_node() { # start_node PORT: a Herald node on the Redis; echoes its PID
  HERALD_LOG=warn HERALD_REDIS_URL=redis://127.0.0.1:$REDIS_PORT HERALD_SERVER_NODE=node$1 \
    "$bin" serve --http 127.0.0.1:$1 --mqtt off >>"$tmp/herald.log" 2>&1 &
  echo $!
}
start_nodes() {
  stop "$a_pid"; stop "$b_pid"
  a_pid=$(start_node $NODE_A); b_pid=$(start_node $NODE_B)
  pids+=($a_pid $b_pid)
  wait_port $NODE_A; wait_port $NODE_B
}
start_single() {
  stop "$single_pid"
  local data
  data=$(mktemp -d -p "$tmp" herald-data.XXXX)
  HERALD_LOG=warn "$bin" serve --http 127.0.0.1:$SINGLE --mqtt off --data "$data" >>"$tmp/herald.log" 2>&1 &
  single_pid=$!
  pids+=($single_pid)
  wait_port $SINGLE
}
start_nchan() { # two Nchan servers on the same Redis
  stop "$na_pid"; stop "$nb_pid"
  local port conf prefix
  for port in $NCHAN_A $NCHAN_B; do
    prefix=$(mktemp -d -p "$tmp" nginx.XXXX)
    mkdir -p "$prefix/tmp" "$prefix/logs"
    conf="$prefix/nchan.conf"
    sed -e "s/127.0.0.1:18091/127.0.0.1:$port/" \
      -e "s|nchan_shared_memory_size 256m;|nchan_shared_memory_size 256m;\n    nchan_redis_url \"redis://127.0.0.1:$REDIS_PORT\";\n    nchan_use_redis on;|" \
      "$repo/bench/nchan.conf" >"$conf"
    nginx -c "$conf" -p "$prefix/" >>"$tmp/nginx.log" 2>&1 &
    if [ $port = $NCHAN_A ]; then na_pid=$!; else nb_pid=$!; fi
    pids+=($!)
    wait_port $port
  done
}

declare -A SUM CPU
commands=()
: >"$raw"
run() { # run LABEL ARGS...: one herald bench run, keeps its summary line
  local label=$1; shift
  commands+=("herald bench $*")
  echo "== $label" >&2
  { echo "### $label"; echo "\$ herald bench $*"; } >>"$raw"
  if "$bin" bench "$@" >"$tmp/run.out" 2>"$tmp/run.err"; then
    SUM[$label]=$(grep '^summary ' "$tmp/run.out" || true)
  else
    echo "FAILED: $(tail -1 "$tmp/run.err")" >&2
    SUM[$label]=''
  fi
  grep -v '^ready ' "$tmp/run.out" >>"$raw" || true
  echo >>"$raw"
}
get() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" ${SUM[$1]:-}"; }
# ticks PID...: CPU ticks of each, space-separated
ticks() { local p; for p in "$@"; do printf '%s ' "$(cpu_ticks "$p")"; done; }
# per LABEL NAME BEFORE AFTER COUNT: µs of CPU per unit
per() { CPU[$1/$2]=$(awk -v b="$3" -v a="$4" -v n="$5" -v hz="$HZ" 'BEGIN { printf "%.1f", (a - b) * 1e6 / hz / n }'); }

# --- 1. acknowledged publishes ----------------------------------------------------
start_single
run publish/sqlite publish --publishers "$PUBS" --messages "$PUB_MSGS" --server http://127.0.0.1:$SINGLE --pid "$single_pid"
stop "$single_pid"
for mode in always everysec; do
  start_redis --appendfsync $mode
  start_nodes
  read -r r0 b0 <<<"$(ticks "$redis_pid" "$b_pid")"
  run publish/redis-$mode publish --publishers "$PUBS" --messages "$PUB_MSGS" --server http://127.0.0.1:$NODE_A --pid "$a_pid"
  read -r r1 b1 <<<"$(ticks "$redis_pid" "$b_pid")"
  per publish/redis-$mode redis "$r0" "$r1" "$PUB_MSGS"
  per publish/redis-$mode other_node "$b0" "$b1" "$PUB_MSGS"
  stop "$a_pid"; stop "$b_pid"
done

# --- 2 and 3. fan-out across nodes (subscribers on B, publisher on A) ---------------
cross() { # cross LABEL SUB_URL PUB_URL PEER SUB_PID PUB_PID MESSAGES RATE [extra]
  local label=$1 sub=$2 pub=$3 peer=$4 spid=$5 ppid=$6 n=$7 rate=$8 ch="bench/$1/$RANDOM"
  commands+=("herald bench fanout --peer $peer --server $sub --subscribers $SUBS --messages $n --rate $rate --channel C --publisher none --pid PID_B &  herald bench fanout --peer $peer --server $pub --subscribers 0 --messages $n --rate $rate --channel C")
  echo "== $label" >&2
  read -r r0 s0 p0 <<<"$(ticks "$redis_pid" "$spid" "$ppid")"
  "$bin" bench fanout --peer "$peer" --server "$sub" --subscribers "$SUBS" --messages "$n" --rate "$rate" \
    --channel "$ch" --publisher none --pid "$spid" --timeout 120 >"$tmp/sub.out" 2>"$tmp/sub.err" &
  local sp=$!
  until grep -q '^ready ' "$tmp/sub.out" 2>/dev/null; do kill -0 $sp 2>/dev/null || break; sleep 0.1; done
  "$bin" bench fanout --peer "$peer" --server "$pub" --subscribers 0 --messages "$n" --rate "$rate" --channel "$ch" \
    >"$tmp/pub.out" 2>"$tmp/pub.err" || true
  wait $sp || true
  read -r r1 s1 p1 <<<"$(ticks "$redis_pid" "$spid" "$ppid")"
  SUM[$label]=$(grep '^summary ' "$tmp/sub.out" || true)
  { echo "### $label"; cat "$tmp/sub.out" "$tmp/pub.out"; echo; } >>"$raw"
  local deliveries=$((SUBS * n))
  per "$label" redis "$r0" "$r1" "$deliveries"
  per "$label" sub_node "$s0" "$s1" "$deliveries"
  per "$label" pub_node "$p0" "$p1" "$deliveries"
}
start_redis
start_nodes
cross burst/herald-redis http://127.0.0.1:$NODE_B http://127.0.0.1:$NODE_A herald "$b_pid" "$a_pid" "$MSGS" 0
cross rate/herald-redis http://127.0.0.1:$NODE_B http://127.0.0.1:$NODE_A herald "$b_pid" "$a_pid" "$LAT_MSGS" "$RATE"
start_nchan
cross burst/nchan-redis http://127.0.0.1:$NCHAN_B http://127.0.0.1:$NCHAN_A nchan "$nb_pid" "$na_pid" "$MSGS" 0
cross rate/nchan-redis http://127.0.0.1:$NCHAN_B http://127.0.0.1:$NCHAN_A nchan "$nb_pid" "$na_pid" "$LAT_MSGS" "$RATE"
start_single
run burst/herald-sqlite fanout --subscribers "$SUBS" --messages "$MSGS" --server http://127.0.0.1:$SINGLE --pid "$single_pid"
run rate/herald-sqlite fanout --subscribers "$SUBS" --messages "$LAT_MSGS" --rate "$RATE" --server http://127.0.0.1:$SINGLE --pid "$single_pid"
stop "$single_pid"

# --- 4. Redis killed and restarted under load ----------------------------------------
chaos() { # chaos LABEL SUB_URL PUB_URL PEER
  local label=$1 sub=$2 pub=$3 peer=$4 ch="bench/chaos/$RANDOM"
  echo "== $label" >&2
  "$bin" bench fanout --peer "$peer" --server "$sub" --subscribers "$CHAOS_SUBS" --messages "$CHAOS_MSGS" \
    --rate "$CHAOS_RATE" --channel "$ch" --publisher none --timeout 60 >"$tmp/sub.out" 2>"$tmp/sub.err" &
  local sp=$!
  until grep -q '^ready ' "$tmp/sub.out" 2>/dev/null; do kill -0 $sp 2>/dev/null || break; sleep 0.1; done
  "$bin" bench fanout --peer "$peer" --server "$pub" --subscribers 0 --messages "$CHAOS_MSGS" --rate "$CHAOS_RATE" \
    --channel "$ch" --retry >"$tmp/pub.out" 2>"$tmp/pub.err" &
  local pp=$!
  sleep 3
  restart_redis
  wait $pp || true
  wait $sp || true
  SUM[$label]=$(grep '^summary ' "$tmp/sub.out" || true)
  SUM[$label/pub]=$(grep '^summary ' "$tmp/pub.out" || true)
  { echo "### $label"; cat "$tmp/sub.out" "$tmp/sub.err" "$tmp/pub.out" "$tmp/pub.err"; echo; } >>"$raw"
}
start_redis
start_nodes
chaos chaos/herald-redis http://127.0.0.1:$NODE_B http://127.0.0.1:$NODE_A herald
start_redis
start_nchan
chaos chaos/nchan-redis http://127.0.0.1:$NCHAN_B http://127.0.0.1:$NCHAN_A nchan

# --- 5. what two idle nodes cost Redis and themselves (sequence checks, liveness) ---
IDLE_S=${IDLE_S:-10}
start_redis
start_nodes
sleep 1
read -r r0 a0 <<<"$(ticks "$redis_pid" "$a_pid")"
sleep "$IDLE_S"
read -r r1 a1 <<<"$(ticks "$redis_pid" "$a_pid")"
IDLE_REDIS=$(awk -v b="$r0" -v a="$r1" -v s="$IDLE_S" -v hz="$HZ" 'BEGIN { printf "%.2f", (a - b) * 100 / hz / s }')
IDLE_NODE=$(awk -v b="$a0" -v a="$a1" -v s="$IDLE_S" -v hz="$HZ" 'BEGIN { printf "%.2f", (a - b) * 100 / hz / s }')
stop "$a_pid"; stop "$b_pid"

# --- report ----------------------------------------------------------------------------
{
  echo "## Scale-out over Redis ($(date -u +%F), $(nproc) cores, redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), commit $(git rev-parse --short HEAD))"
  echo
  echo "Acknowledged publishes ($PUBS publishers, $PUB_MSGS messages, HTTP):"
  echo
  echo "| store | publishes/s | publishing node µs/publish | other node µs/publish | Redis µs/publish |"
  echo "|---|---|---|---|---|"
  echo "| SQLite, one node | $(get publish/sqlite per_s) | $(get publish/sqlite server_us_per_publish) | | |"
  for mode in always everysec; do
    echo "| Redis, appendfsync $mode | $(get publish/redis-$mode per_s) | $(get publish/redis-$mode server_us_per_publish) | ${CPU[publish/redis-$mode/other_node]:-} | ${CPU[publish/redis-$mode/redis]:-} |"
  done
  echo
  echo "Fan-out across nodes ($SUBS SSE subscribers on node B, the publisher on node A; Nchan: two nginx on the same Redis):"
  echo
  echo "| run | p50 ms | p99 ms | lost | subscriber node µs/delivery | publishing node µs/delivery | Redis µs/delivery |"
  echo "|---|---|---|---|---|---|---|"
  for l in burst/herald-redis burst/nchan-redis rate/herald-redis rate/nchan-redis; do
    echo "| $l | $(get $l p50_ms) | $(get $l p99_ms) | $(get $l lost) | ${CPU[$l/sub_node]:-} | ${CPU[$l/pub_node]:-} | ${CPU[$l/redis]:-} |"
  done
  for l in burst/herald-sqlite rate/herald-sqlite; do
    echo "| $l (one node) | $(get $l p50_ms) | $(get $l p99_ms) | $(get $l lost) | $(get $l server_us_per_delivery) | | |"
  done
  echo
  echo "Redis killed and restarted (AOF, appendfsync always) 3 s into $CHAOS_MSGS messages at $CHAOS_RATE/s to $CHAOS_SUBS subscribers on another node:"
  echo
  echo "| system | delivered | expected | lost | duplicates | out of order | publish retries |"
  echo "|---|---|---|---|---|---|---|"
  for s in herald-redis nchan-redis; do
    l=chaos/$s
    echo "| $s | $(get $l deliveries) | $(get $l expected) | $(get $l lost) | $(get $l dup) | $(get $l ooo) | $(get $l/pub retries) |"
  done
  echo
  echo "Idle, two nodes on one Redis, $IDLE_S s (16 partitions checked every second per node, liveness stamps): Redis ${IDLE_REDIS}% of a core, a node ${IDLE_NODE}%."
  echo
  echo "Commands:"
  echo
  for c in "${commands[@]}"; do echo "    $c"; done
} >"$out"
echo "report: $out (raw: $raw)" >&2
