#!/usr/bin/env bash
# Herald and Mosquitto side by side over MQTT, on loopback, one run:
# fan-out (server CPU per delivery, latency, loss) and idle memory per connection.
# Needs Debian's mosquitto and a release build (cargo build --release -p herald).
#   bench/compare_mqtt.sh [SUBSCRIBERS] [MESSAGES] [IDLE_CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
subs=${1:-1000}; msgs=${2:-1000}; idle=${3:-10000}
ulimit -n 20000
bin=target/release/herald
command -v mosquitto >/dev/null || { apt-get install -y -qq mosquitto >/dev/null; }

data=$(mktemp -d)
HERALD_LOG=warn $bin serve --http 127.0.0.1:18090 --mqtt 127.0.0.1:18830 --data "$data" >/dev/null 2>&1 &
herald=$!
/usr/sbin/mosquitto -c bench/mosquitto.conf >/dev/null 2>&1 &
mosq=$!
trap 'kill $herald $mosq 2>/dev/null; rm -rf "$data"' EXIT
sleep 1

run() { echo "### $1"; shift; "$@" 2>&1 | grep -v connected; echo; }
for t in mqtt0 mqtt1; do
  run "herald $t fanout" $bin bench fanout --transport $t --subscribers $subs --messages $msgs --server http://127.0.0.1:18090 --mqtt 127.0.0.1:18830 --pid $herald
  run "mosquitto $t fanout" $bin bench fanout --transport $t --subscribers $subs --messages $msgs --mqtt 127.0.0.1:1884 --pid $mosq
done
run "herald mqtt idle" $bin bench idle --transport mqtt0 --connections $idle --server http://127.0.0.1:18090 --mqtt 127.0.0.1:18830 --pid $herald
run "mosquitto mqtt idle" $bin bench idle --transport mqtt0 --connections $idle --mqtt 127.0.0.1:1884 --pid $mosq
