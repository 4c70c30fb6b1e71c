#!/usr/bin/env bash
# Herald side by side with Nchan (SSE, WebSocket, long poll; bench/nchan.conf)
# and Mosquitto (MQTT; bench/mosquitto.conf), on loopback, in one run; then
# Herald alone with MIX connections of mixed transports over several client
# processes. Writes a markdown report with every figure, Herald's ratio to the
# peer, the machine and the exact commands; raw outputs go beside it.
#
#   bench/compare.sh [RESULTS.md]          (default bench/results.md, which is
#                                          also spliced into BENCHMARKS.md)
#
# Knobs (environment), defaults for the full run:
#   SUBS=1000 MSGS=1000       fan-out burst: subscribers x messages
#   LAT_SUBS=1000 LAT_MSGS=200 RATE=20
#                             latency at a steady publish rate
#   IDLE=10000                idle connections, each figure on a fresh server
#   MIX=19000 MIX_PROCS=3 MIX_MSGS=1 MIX_TRANSPORTS=sse,ws,longpoll,mqtt0
#                             Herald with MIX connections over MIX_PROCS client
#                             processes (one process may hold 20,000 files)
#   MIX_CONNECT=32            connects in flight per mix process: all of them
#                             together stay well below an accept backlog (Herald
#                             asks for 4096; Mosquitto's is 100)
#   TIMEOUT=180               seconds a fan-out run waits for its deliveries
#   BUILD=1                   0 skips `cargo build --release -p herald`
# Smoke test (a minute or two):
#   SUBS=100 MSGS=100 LAT_SUBS=100 LAT_MSGS=20 IDLE=1000 MIX=2000 bench/compare.sh /tmp/smoke.md
#
# Every server is started here and stopped by its own PID; nothing else is
# touched. Ports: Herald 18090 (HTTP) and 18830 (MQTT), Nchan 18091 (fixed in
# bench/nchan.conf), Mosquitto 1884 (fixed in bench/mosquitto.conf).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${1:-bench/results.md}
raw=${out%.md}-raw.txt
SUBS=${SUBS:-1000} MSGS=${MSGS:-1000}
LAT_SUBS=${LAT_SUBS:-1000} LAT_MSGS=${LAT_MSGS:-200} RATE=${RATE:-20}
IDLE=${IDLE:-10000}
MIX=${MIX:-19000} MIX_PROCS=${MIX_PROCS:-3} MIX_MSGS=${MIX_MSGS:-1} MIX_TRANSPORTS=${MIX_TRANSPORTS:-sse,ws,longpoll,mqtt0}
MIX_CONNECT=${MIX_CONNECT:-32}
TIMEOUT=${TIMEOUT:-180} BUILD=${BUILD:-1}
HERALD_HTTP=18090 HERALD_MQTT=18830 NCHAN_PORT=18091 MOSQ_PORT=1884
H_URL=http://127.0.0.1:$HERALD_HTTP N_URL=http://127.0.0.1:$NCHAN_PORT

ulimit -n 20000
bin=$repo/target/release/herald

# --- what the run needs -------------------------------------------------------
install_peers() {
  local missing=()
  command -v nginx >/dev/null || missing+=(nginx)
  [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(libnginx-mod-nchan)
  [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  [ ${#missing[@]} -eq 0 ] && return
  echo "installing ${missing[*]}" >&2
  apt-get install -y -qq "${missing[@]}" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}
install_peers
if [ "$BUILD" = 1 ]; then cargo build --release -p herald; fi

tmp=$(mktemp -d)
herald_pid='' nchan_pid='' mosq_pid=''
mix_pids=()
cleanup() {
  for p in "${mix_pids[@]}" $herald_pid $nchan_pid $mosq_pid; do kill "$p" 2>/dev/null || true; done
  for p in "${mix_pids[@]}" $herald_pid $nchan_pid $mosq_pid; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# --- servers, each started fresh and stopped by its PID -------------------------
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}
stop() { # stop PID: kill it and wait for it to exit
  [ -n "$1" ] || return 0
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
start_herald() {
  stop "$herald_pid"
  local data
  data=$(mktemp -d -p "$tmp" herald-data.XXXX)
  HERALD_LOG=warn "$bin" serve --http 127.0.0.1:$HERALD_HTTP --mqtt 127.0.0.1:$HERALD_MQTT --data "$data" \
    >>"$tmp/herald.log" 2>&1 &
  herald_pid=$!
  wait_port $HERALD_HTTP && wait_port $HERALD_MQTT
}
start_nchan() {
  stop "$nchan_pid"
  local prefix
  prefix=$(mktemp -d -p "$tmp" nginx.XXXX)
  mkdir -p "$prefix/tmp" "$prefix/logs"
  nginx -c "$repo/bench/nchan.conf" -p "$prefix/" >>"$tmp/nginx.log" 2>&1 &
  nchan_pid=$!
  wait_port $NCHAN_PORT
}
start_mosquitto() {
  stop "$mosq_pid"
  /usr/sbin/mosquitto -c "$repo/bench/mosquitto.conf" >>"$tmp/mosquitto.log" 2>&1 &
  mosq_pid=$!
  wait_port $MOSQ_PORT
}
stop_all() {
  stop "$herald_pid"; stop "$nchan_pid"; stop "$mosq_pid"
  herald_pid='' nchan_pid='' mosq_pid=''
}

# --- runs and their figures ----------------------------------------------------
declare -A SUM   # label -> the run's `summary` line
commands=()
: >"$raw"
bench() { # bench LABEL ARGS...: one `herald bench` run; keeps its summary line
  local label=$1; shift
  local cmd="herald bench $*"
  commands+=("$cmd")
  echo "== $label" >&2
  { echo "### $label"; echo "\$ $cmd"; } >>"$raw"
  if "$bin" bench "$@" >"$tmp/run.out" 2>"$tmp/run.err"; then
    SUM[$label]=$(grep '^summary ' "$tmp/run.out" || true)
  else
    echo "FAILED: $(tail -1 "$tmp/run.err")" >&2
    SUM[$label]=''
  fi
  grep -v '^ready ' "$tmp/run.out" >>"$raw" || true
  grep -v 'subscribers connected' "$tmp/run.err" >>"$raw" || true
  echo >>"$raw"
}
get() { # get LABEL KEY: one figure of a run, or empty
  sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" ${SUM[$1]:-}"
}
herald_args() { echo --server $H_URL --mqtt 127.0.0.1:$HERALD_MQTT --pid "$herald_pid"; }
nchan_args() { echo --peer nchan --server $N_URL --pid "$nchan_pid"; }
mosq_args() { echo --mqtt 127.0.0.1:$MOSQ_PORT --pid "$mosq_pid"; }

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# The resident split: "ANON FILE" kB (the heap and stacks; the mapped binary and libraries).
rss_split_kb() { awk '/^RssAnon:/ {a = $2} /^RssFile:/ {f = $2} END {print a, f}' "/proc/$1/status"; }
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# --- 1. fan-out in a burst, and latency at a steady rate ------------------------
start_herald; start_nchan; start_mosquitto
for t in sse ws longpoll; do
  burst=(fanout --transport $t --subscribers "$SUBS" --messages "$MSGS" --timeout "$TIMEOUT")
  bench "burst/herald/$t" "${burst[@]}" $(herald_args)
  bench "burst/nchan/$t" "${burst[@]}" $(nchan_args)
done
for t in mqtt0 mqtt1; do
  burst=(fanout --transport $t --subscribers "$SUBS" --messages "$MSGS" --timeout "$TIMEOUT")
  bench "burst/herald/$t" "${burst[@]}" $(herald_args)
  bench "burst/mosquitto/$t" "${burst[@]}" $(mosq_args)
done
for t in sse ws longpoll mqtt0 mqtt1; do
  steady=(fanout --transport $t --subscribers "$LAT_SUBS" --messages "$LAT_MSGS" --rate "$RATE" --timeout "$TIMEOUT")
  bench "rate/herald/$t" "${steady[@]}" $(herald_args)
  case $t in
    mqtt*) bench "rate/mosquitto/$t" "${steady[@]}" $(mosq_args) ;;
    *) bench "rate/nchan/$t" "${steady[@]}" $(nchan_args) ;;
  esac
done
stop_all

# --- 2. idle memory per connection, each on a fresh server ---------------------
# Memory a server freed after an earlier run would be reused and hide the cost.
for t in sse ws longpoll mqtt0; do
  start_herald
  bench "idle/herald/$t" idle --transport $t --connections "$IDLE" $(herald_args)
  stop_all
  case $t in
    mqtt0) start_mosquitto; bench "idle/mosquitto/$t" idle --transport $t --connections "$IDLE" $(mosq_args) ;;
    *) start_nchan; bench "idle/nchan/$t" idle --transport $t --connections "$IDLE" $(nchan_args) ;;
  esac
  stop_all
done

# --- 3. Herald with MIX mixed connections over several processes ----------------
mix_run() {
  start_herald
  local per=$(((MIX + MIX_PROCS - 1) / MIX_PROCS)) rss0 i
  rss0=$(rss_kb "$herald_pid")
  local sub=(fanout --transport "$MIX_TRANSPORTS" --subscribers "$per" --messages "$MIX_MSGS" --channel bench/mix
    --publisher none --timeout "$TIMEOUT" --connect-concurrency "$MIX_CONNECT" $(herald_args))
  commands+=("herald bench ${sub[*]} --latencies FILE   (x$MIX_PROCS processes at once)")
  echo "== mix: $MIX_PROCS x $per connections" >&2
  mix_pids=()
  for i in $(seq "$MIX_PROCS"); do
    "$bin" bench "${sub[@]}" --latencies "$tmp/mix.lat.$i" >"$tmp/mix.$i.out" 2>"$tmp/mix.$i.err" &
    mix_pids+=($!)
  done
  # Wait until every process says `ready N` (or one gave up).
  local deadline=$((SECONDS + 300)) ready
  while :; do
    ready=$(cat "$tmp"/mix.*.out | awk '/^ready / {n++; s += $2} END {print n + 0, s + 0}')
    [ "${ready% *}" -eq "$MIX_PROCS" ] && break
    for p in "${mix_pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { echo "a mix client gave up: $(cat "$tmp"/mix.*.err | tail -3)" >&2; return 1; }
    done
    [ $SECONDS -lt $deadline ] || { echo "mix clients not ready in 300 s" >&2; return 1; }
    sleep 0.5
  done
  sleep 2 # let the server settle its buffers before reading memory
  MIX_CONNECTED=${ready#* } MIX_RSS0=$rss0 MIX_RSS=$(rss_kb "$herald_pid")
  read -r MIX_ANON MIX_FILE < <(rss_split_kb "$herald_pid")
  local cpu0
  cpu0=$(cpu_ticks "$herald_pid")
  bench "mix/publish" fanout --subscribers 0 --messages "$MIX_MSGS" --channel bench/mix $(herald_args)
  for p in "${mix_pids[@]}"; do wait "$p" || true; done
  mix_pids=()
  MIX_CPU_MS=$((($(cpu_ticks "$herald_pid") - cpu0) * 1000 / $(getconf CLK_TCK)))
  for i in $(seq "$MIX_PROCS"); do
    SUM[mix/$i]=$(grep '^summary ' "$tmp/mix.$i.out" || true)
    { echo "### mix client $i"; grep -v '^ready ' "$tmp/mix.$i.out"; echo; } >>"$raw"
  done
  # Exact quantiles over every process's deliveries.
  read -r MIX_N MIX_P50 MIX_P99 MIX_MAX < <(cat "$tmp"/mix.lat.* | sort -n | awk '
    { v[NR] = $1; c[NR] = $2; n += $2 }
    END {
      if (n == 0) { print 0, "-", "-", "-"; exit }
      for (i = 1; i <= NR; i++) {
        k += c[i]
        if (!p50 && k >= 0.5 * n) p50 = v[i]
        if (!p99 && k >= 0.99 * n) p99 = v[i]
      }
      printf "%d %.2f %.2f %.2f\n", n, p50 / 1000, p99 / 1000, v[NR] / 1000
    }')
  stop_all
}
MIX_CONNECTED=0 MIX_RSS0=0 MIX_RSS=0 MIX_ANON=0 MIX_FILE=0 MIX_CPU_MS=0 MIX_N=0 MIX_P50=- MIX_P99=- MIX_MAX=-
mix_run || echo "the mixed-connection run failed" >&2
stop_all

# --- the report ---------------------------------------------------------------
ratio() { # Herald / peer, when both are numbers and the peer's is not 0
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) printf "%.2f×", a / b }'
}
cell() { local v; v=$(get "$1" "$2"); echo "${v:-–}"; }
count() { local v; v=$(get "$1" "$2"); echo "${v:-0}"; }
errors() { local l; l=$(get "$1" lost); [ -n "$l" ] && echo "$l / $(get "$1" dup) / $(get "$1" ooo)" || echo "–"; }
# table KIND PEER TRANSPORTS... : rows of figures, columns Herald | peer | ratio per transport
table() {
  local kind=$1 peer=$2; shift 2
  local t head="| |" rule="|---|" row key label
  for t in "$@"; do head+=" Herald $t | ${peer^} $t | ratio |"; rule+="---:|---:|---:|"; done
  echo "$head"; echo "$rule"
  for row in "per_s:deliveries/s" "server_us_per_delivery:server CPU per delivery (µs)" \
    "p50_ms:latency p50 (ms)" "p99_ms:latency p99 (ms)" "max_ms:latency max (ms)" "errors:lost / duplicated / out of order" \
    "server_rss_mb:server RSS after (MB)" "tool_cpu_s:bench tool CPU (s)" "connect_per_s:connect rate (/s)" \
    "publish_s:publish time (s)"; do
    key=${row%%:*} label=${row#*:}
    local line="| $label |"
    for t in "$@"; do
      if [ "$key" = errors ]; then
        line+=" $(errors "$kind/herald/$t") | $(errors "$kind/$peer/$t") | |"
      else
        local h p
        h=$(cell "$kind/herald/$t" "$key") p=$(cell "$kind/$peer/$t" "$key")
        line+=" $h | $p | $(ratio "$h" "$p") |"
      fi
    done
    echo "$line"
  done
}
idle_table() {
  echo "| transport | Herald KB/conn | peer | peer KB/conn | ratio | Herald connect/s | peer connect/s |"
  echo "|---|---:|---|---:|---:|---:|---:|"
  local t peer h p
  for t in sse ws longpoll mqtt0; do
    case $t in mqtt0) peer=mosquitto ;; *) peer=nchan ;; esac
    h=$(cell "idle/herald/$t" kb_per_conn) p=$(cell "idle/$peer/$t" kb_per_conn)
    echo "| $t | $h | ${peer^} | $p | $(ratio "$h" "$p") | $(cell "idle/herald/$t" connect_per_s) | $(cell "idle/$peer/$t" connect_per_s) |"
  done
}
mix_table() {
  local i d=0 e=0 l=0 dup=0 ooo=0 slowest=0
  for i in $(seq "$MIX_PROCS"); do
    d=$((d + $(count "mix/$i" deliveries))) e=$((e + $(count "mix/$i" expected)))
    l=$((l + $(count "mix/$i" lost))) dup=$((dup + $(count "mix/$i" dup))) ooo=$((ooo + $(count "mix/$i" ooo)))
    slowest=$(awk -v a="$slowest" -v b="$(get "mix/$i" connect_s)" 'BEGIN { print (b + 0 > a + 0) ? b : a }')
  done
  echo "| figure | Herald |"
  echo "|---|---:|"
  echo "| connections (transports $MIX_TRANSPORTS, round-robin) | $MIX_CONNECTED over $MIX_PROCS processes |"
  echo "| connect rate, all processes together | $(awk -v n="$MIX_CONNECTED" -v s="$slowest" 'BEGIN { if (s > 0) printf "%.0f/s", n / s }') |"
  echo "| server RSS before → all connected | $(awk -v a="$MIX_RSS0" -v b="$MIX_RSS" 'BEGIN { printf "%.1f MB → %.1f MB", a / 1024, b / 1024 }') |"
  echo "| … of which anonymous (heap, stacks) / file-backed (binary, libraries) | $(awk -v a="$MIX_ANON" -v f="$MIX_FILE" 'BEGIN { printf "%.1f MB / %.1f MB", a / 1024, f / 1024 }') |"
  echo "| memory per connection | $(awk -v a="$MIX_RSS0" -v b="$MIX_RSS" -v n="$MIX_CONNECTED" 'BEGIN { if (n > 0) printf "%.2f KB", (b - a) / n }') |"
  echo "| messages to all | $MIX_MSGS |"
  echo "| deliveries | $d of $e |"
  echo "| lost / duplicated / out of order | $l / $dup / $ooo |"
  echo "| latency p50 / p99 / max (all processes merged) | $MIX_P50 / $MIX_P99 / $MIX_MAX ms |"
  echo "| server CPU from the publish to the last delivery | $MIX_CPU_MS ms ($(awk -v c="$MIX_CPU_MS" -v d="$d" 'BEGIN { if (d > 0) printf "%.2f µs", c * 1000 / d }') per delivery) |"
}

{
  echo "# Herald side by side with Nchan and Mosquitto"
  echo
  echo "Generated by \`bench/compare.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'). Raw outputs went to \`$raw\` (not kept in git)."
  echo
  echo "- Machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r), Debian $(cat /etc/debian_version 2>/dev/null || echo '?')"
  echo "- Herald: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates 2>/dev/null || echo ' (with uncommitted changes)'), \`cargo build --release -p herald\`, SQLite store in a fresh data directory, defaults"
  echo "- Nchan: $(nginx -v 2>&1 | sed 's/.*: //'), libnginx-mod-nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null), \`bench/nchan.conf\` (one process)"
  echo "- Mosquitto: $(dpkg-query -W -f '${Version}' mosquitto 2>/dev/null), \`bench/mosquitto.conf\`"
  echo "- The load tool (\`herald bench\`) shares the machine; its CPU is reported beside the servers'. Ratios are Herald / peer (below 1 is better for CPU, latency and memory; above 1 for rates)."
  echo
  echo "## Fan-out: $SUBS subscribers × $MSGS messages of ~100 bytes, published in a burst"
  echo
  echo "Published one after another over HTTP (MQTT runs: over MQTT QoS 1, each waiting for its PUBACK)."
  echo
  table burst nchan sse ws longpoll
  echo
  table burst mosquitto mqtt0 mqtt1
  echo
  echo "## Latency: $LAT_SUBS subscribers, $LAT_MSGS messages at $RATE/s"
  echo
  table rate nchan sse ws longpoll
  echo
  table rate mosquitto mqtt0 mqtt1
  echo
  echo "## Idle memory per connection: $IDLE connections, each on a fresh server"
  echo
  idle_table
  echo
  echo "## Herald with $MIX mixed connections"
  echo
  echo "Clients split over $MIX_PROCS processes (one process may hold at most 20,000 files) on one channel; once all are connected, one more process publishes $MIX_MSGS message(s) to all."
  echo
  mix_table
  echo
  echo "## Commands"
  echo
  echo "\`SUBS=$SUBS MSGS=$MSGS LAT_SUBS=$LAT_SUBS LAT_MSGS=$LAT_MSGS RATE=$RATE IDLE=$IDLE MIX=$MIX MIX_PROCS=$MIX_PROCS MIX_MSGS=$MIX_MSGS MIX_CONNECT=$MIX_CONNECT TIMEOUT=$TIMEOUT bench/compare.sh $out\` ran, with \`ulimit -n 20000\`:"
  echo
  echo '```sh'
  echo "herald serve --http 127.0.0.1:$HERALD_HTTP --mqtt 127.0.0.1:$HERALD_MQTT --data FRESH_DIR"
  echo "nginx -c \$PWD/bench/nchan.conf -p FRESH_DIR/"
  echo "mosquitto -c bench/mosquitto.conf"
  printf '%s\n' "${commands[@]}"
  echo '```'
} >"$out"
echo "wrote $out and $raw" >&2

# A full run with the default output also rewrites the comparison section of
# BENCHMARKS.md (between its compare.sh markers), headings one level down.
if [ "$out" = bench/results.md ] && grep -q '<!-- compare.sh begins' BENCHMARKS.md; then
  awk -v report="$out" '
    /<!-- compare.sh begins/ {
      print
      while ((getline line < report) > 0) { if (line ~ /^#/) line = "#" line; print line }
      skip = 1; next
    }
    /<!-- compare.sh ends/ { skip = 0 }
    !skip' BENCHMARKS.md >BENCHMARKS.md.tmp && mv BENCHMARKS.md.tmp BENCHMARKS.md
  echo "updated BENCHMARKS.md" >&2
fi
