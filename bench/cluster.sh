#!/usr/bin/env bash
# Clustering benchmark: throughput and p99 of the `hello` example with 1 and 2
# workers against single-process tokio multi-thread servers (raw hyper, and
# axum, the framework the example uses), side by side in one run; idle worker
# RSS; time to replace a killed worker.
#
# Usage: bench/cluster.sh [SECONDS_PER_RUN]   (default 10; loopback only)
# Needs wrk (apt-get install wrk); builds everything in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
CONNS=${CONNS:-64}

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
cargo build --release -q -p corral --example hello
cargo build --release -q -p corral-bench
HELLO=target/release/examples/hello
PLAIN=target/release/plain_hyper
AXUM=target/release/plain_axum
RESPAWN=target/release/respawn_time
# shellcheck source=bench/lib.sh
source bench/lib.sh

# load PATH: runs wrk against $ADDR and prints "RPS P99_MS"
load() {
  local out
  out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency "http://$ADDR$1")
  local rps p99 errors
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
  errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
  [ -n "$errors" ] && echo "warning: $errors" >&2
  echo "$rps $p99"
}

declare -A RESULT
run() { # run LABEL PATH CMD...
  local label=$1 path=$2; shift 2
  start "$label" "$@"
  sleep 0.5
  RESULT["$label|$path"]=$(load "$path")
  stop
}

for path in "/" "/work?us=200"; do
  run "corral hello, 1 worker"  "$path" "$HELLO" --listen 127.0.0.1:0 --workers 1
  run "corral hello, 2 workers" "$path" "$HELLO" --listen 127.0.0.1:0 --workers 2
  run "plain tokio+hyper, 1 process (multi-thread)" "$path" "$PLAIN" 127.0.0.1:0
  run "plain tokio+axum, 1 process (multi-thread)" "$path" "$AXUM" 127.0.0.1:0
done

# Idle worker RSS
start idle "$HELLO" --listen 127.0.0.1:0 --workers 2
sleep 1
RSS_KB=$(for c in $(pgrep -P "$SERVER_PID"); do awk '/VmRSS/ {print $2}' "/proc/$c/status"; done | sort -n | tail -1)
stop

RESPAWN_LINE=$("$RESPAWN" "$HELLO" "${ROUNDS:-50}")

echo
echo "Machine: $(nproc) cores, $(lscpu | sed -n 's/Model name:[ ]*//p'), $(uname -sr)"
echo "Command: bench/cluster.sh $SECS   (wrk -t2 -c$CONNS -d${SECS}s --latency)"
echo
echo "| server | path | requests/s | p99 ms |"
echo "|---|---|---:|---:|"
for path in "/" "/work?us=200"; do
  for label in "corral hello, 1 worker" "corral hello, 2 workers" "plain tokio+hyper, 1 process (multi-thread)" "plain tokio+axum, 1 process (multi-thread)"; do
    read -r rps p99 <<<"${RESULT["$label|$path"]}"
    echo "| $label | \`$path\` | $rps | $p99 |"
  done
done
one=$(echo "${RESULT["corral hello, 1 worker|/work?us=200"]}" | cut -d' ' -f1)
two=$(echo "${RESULT["corral hello, 2 workers|/work?us=200"]}" | cut -d' ' -f1)
two_hello=$(echo "${RESULT["corral hello, 2 workers|/"]}" | cut -d' ' -f1)
plain_hello=$(echo "${RESULT["plain tokio+hyper, 1 process (multi-thread)|/"]}" | cut -d' ' -f1)
axum_hello=$(echo "${RESULT["plain tokio+axum, 1 process (multi-thread)|/"]}" | cut -d' ' -f1)
echo
echo "- /work?us=200 scaling, 2 workers / 1 worker: $(ratio "$two" "$one")x (target >= 1.8x)"
echo "- hello world, corral 2 workers / plain hyper: $(ratio "$two_hello" "$plain_hello")x (target >= 0.95x)"
echo "- hello world, corral 2 workers / plain axum (same framework as the example): $(ratio "$two_hello" "$axum_hello")x"
echo "- idle worker RSS: $((RSS_KB / 1024)) MiB ($RSS_KB KiB; target <= 10 MiB)"
echo "- killed worker replaced and serving: $RESPAWN_LINE (target median <= 50 ms)"
