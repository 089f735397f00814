#!/usr/bin/env bash
# Balancing benchmark: hello-world throughput and p99 of corral's
# round-robin and least-conn modes (accept-and-pass through the primary) and
# sticky (steered by the kernel) against reuseport (kernel balancing),
# with keep-alive and with a new connection per request, and the same for
# Node's cluster module (round-robin), all side by side in one run.
#
# Usage: bench/balance.sh [SECONDS_PER_RUN]   (default 10; loopback only)
# Needs wrk (apt-get install wrk) and node; builds corral in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-2}

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }
cargo build --release -q -p corral --example hello
cargo build --release -q -p corral-bench --bin loadgen
LOADGEN=target/release/loadgen
SOURCES=${SOURCES:-32}
HELLO=target/release/examples/hello
# shellcheck source=bench/lib.sh
source bench/lib.sh

load() { # load EXTRA_WRK_ARGS...: prints "RPS P99_MS ERRORS"
  local out rps p99 errs
  out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency "$@" "http://$ADDR/")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
  errs=$(echo "$out" | awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10; f=1} END {if (!f) print 0}')
  echo "$rps $p99 $errs"
}

declare -A RESULT MANY
SERVERS=("corral reuseport" "corral round-robin" "corral least-conn" "corral sticky" "node cluster round-robin")
command_for() {
  case "$1" in
    "corral reuseport") echo "$HELLO --listen 127.0.0.1:0 --workers $WORKERS --balance reuseport" ;;
    "corral round-robin") echo "$HELLO --listen 127.0.0.1:0 --workers $WORKERS --balance round-robin" ;;
    "corral least-conn") echo "$HELLO --listen 127.0.0.1:0 --workers $WORKERS --balance least-conn" ;;
    "corral sticky") echo "$HELLO --listen 127.0.0.1:0 --workers $WORKERS --balance sticky" ;;
    "node cluster round-robin") echo "node bench/peers/node-cluster/server.js $WORKERS" ;;
  esac
}
for server in "${SERVERS[@]}"; do
  # shellcheck disable=SC2046
  start "x" $(command_for "$server")
  sleep 0.5
  RESULT["$server|keep-alive"]=$(load)
  RESULT["$server|new connection"]=$(load -H "Connection: close")
  # The same from $SOURCES client addresses, so sticky has clients to spread.
  for mode in keep-alive new-connection; do
    out=$("$LOADGEN" "$ADDR" "$SECS" "$CONNS" "$SOURCES" "$mode")
    MANY["$server|$mode"]=$(echo "$out" | sed -E 's/requests_per_s=([0-9.]+) p50_ms=([0-9.]+) p99_ms=([0-9.]+) errors=([0-9]+)/\1 \3 \4/')
  done
  stop
done

# table RESULTS ERRORS_HEADER MODE...: a markdown row per server and mode from
# the associative array named RESULTS ("RPS P99_MS ERRORS" values).
table() {
  local -n results=$1
  local errors=$2
  shift 2
  echo "| server | connections | requests/s | p99 ms | $errors |"
  echo "|---|---|---:|---:|---:|"
  for mode in "$@"; do
    for server in "${SERVERS[@]}"; do
      read -r rps p99 errs <<<"${results["$server|$mode"]}"
      echo "| $server | $mode | $rps | $p99 | $errs |"
    done
  done
}
# rate RESULTS SERVER MODE: the requests/s of one row.
rate() { local -n results=$1; echo "${results["$2|$3"]}" | cut -d' ' -f1; }

echo
echo "Machine: $(nproc) cores, $(lscpu | sed -n 's/Model name:[ ]*//p'), $(uname -sr); node $(node --version)"
echo "Command: bench/balance.sh $SECS   (wrk -t2 -c$CONNS -d${SECS}s --latency; $WORKERS workers each)"
echo
table RESULT "socket errors" "keep-alive" "new connection"
rps() { rate RESULT "$1" "$2"; }
echo
for mode in "keep-alive" "new connection"; do
  echo "- $mode: round-robin / reuseport $(ratio "$(rps "corral round-robin" "$mode")" "$(rps "corral reuseport" "$mode")")x, least-conn / reuseport $(ratio "$(rps "corral least-conn" "$mode")" "$(rps "corral reuseport" "$mode")")x, sticky / reuseport $(ratio "$(rps "corral sticky" "$mode")" "$(rps "corral reuseport" "$mode")")x, corral round-robin / node cluster $(ratio "$(rps "corral round-robin" "$mode")" "$(rps "node cluster round-robin" "$mode")")x, corral sticky / node cluster $(ratio "$(rps "corral sticky" "$mode")" "$(rps "node cluster round-robin" "$mode")")x"
done

echo
echo "Many clients: bench/src/bin/loadgen.rs, $CONNS connections from $SOURCES loopback addresses, ${SECS}s"
echo
table MANY "errors" keep-alive new-connection
many() { rate MANY "$1" "$2"; }
echo
for mode in keep-alive new-connection; do
  echo "- $mode, many clients: round-robin / reuseport $(ratio "$(many "corral round-robin" "$mode")" "$(many "corral reuseport" "$mode")")x, least-conn / reuseport $(ratio "$(many "corral least-conn" "$mode")" "$(many "corral reuseport" "$mode")")x, sticky / reuseport $(ratio "$(many "corral sticky" "$mode")" "$(many "corral reuseport" "$mode")")x, sticky / node cluster $(ratio "$(many "corral sticky" "$mode")" "$(many "node cluster round-robin" "$mode")")x"
done
