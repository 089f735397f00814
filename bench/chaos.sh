#!/usr/bin/env bash
# Chaos: 60 s of load (new and keep-alive connections, 3 s timeout per
# request) on the `hello` example while a random action hits it every 1-3 s:
# kill -9 of a worker, SIGSTOP of a worker for 0.5-7 s then SIGCONT, SIGHUP,
# SIGTTIN, SIGTTOU. Run for reuseport and round-robin. Reports failed
# requests by kind, the primary's fd count and RSS at start and end, and the
# workers and every slot's state at the end.
#
# Usage: bench/chaos.sh [SECONDS] [MODES...]   (default 60, reuseport round-robin)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
shift || true
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(reuseport round-robin)
WORKERS=${WORKERS:-2}
cargo build --release -q -p corral --example hello
cargo build --release -q -p corral-bench --bin chaos_load
HELLO=target/release/examples/hello
LOAD=target/release/chaos_load
# shellcheck source=bench/lib.sh
source bench/lib.sh

fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
admin_of() { grep -o 'admin: http://[0-9.:]*' "$TMP/$1.err" | head -1 | sed 's|admin: http://||'; }
rand_between() { awk -v a="$1" -v b="$2" -v r="$RANDOM" 'BEGIN { srand(r); printf "%.2f", a + rand() * (b - a) }'; }

echo "machine: $(machine)"
echo "command: bench/chaos.sh $SECS ${MODES[*]} (workers $WORKERS)"
for mode in "${MODES[@]}"; do
  start "chaos-$mode" "$HELLO" --listen 127.0.0.1:0 --workers "$WORKERS" --balance "$mode" --admin 127.0.0.1:0
  primary=$SERVER_PID
  sleep 0.5
  admin=$(admin_of "chaos-$mode")
  fd_start=$(fds "$primary"); rss_start=$(rss_kib "$primary")
  "$LOAD" "$ADDR" "$SECS" 8 >"$TMP/load-$mode.json" &
  load_pid=$!
  BG+=("$load_pid")
  expected=$WORKERS
  declare -A actions=()
  end=$((SECONDS + SECS - 3))
  while [ $SECONDS -lt $end ]; do
    sleep "$(rand_between 1 3)"
    mapfile -t workers < <(pgrep -P "$primary" || true)
    [ ${#workers[@]} -gt 0 ] || continue
    victim=${workers[$((RANDOM % ${#workers[@]}))]}
    case $((RANDOM % 5)) in
      0) kill -KILL "$victim" 2>/dev/null && actions[kill9]=$((${actions[kill9]:-0} + 1)) ;;
      1) pause=$(rand_between 0.5 7)
         kill -STOP "$victim" 2>/dev/null && { sleep "$pause"; kill -CONT "$victim" 2>/dev/null || true; }
         actions[sigstop]=$((${actions[sigstop]:-0} + 1)) ;;
      2) kill -HUP "$primary"; actions[sighup]=$((${actions[sighup]:-0} + 1)) ;;
      3) kill -TTIN "$primary"; expected=$((expected + 1)); actions[sigttin]=$((${actions[sigttin]:-0} + 1)) ;;
      4) kill -TTOU "$primary"; [ "$expected" -gt 1 ] && expected=$((expected - 1)); actions[sigttou]=$((${actions[sigttou]:-0} + 1)) ;;
    esac
  done
  wait "$load_pid" || true
  # Let restarts and back-offs settle (a given-up slot is retried within 30 s).
  for _ in $(seq 60); do
    serving=$(curl -s "http://$admin/status" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(1 for x in s["slots"] if x["state"]=="serving"), len(s["slots"]))' 2>/dev/null || echo "0 0")
    [ "$serving" = "$expected $expected" ] && break
    sleep 0.5
  done
  fd_end=$(fds "$primary"); rss_end=$(rss_kib "$primary")
  echo
  echo "== $mode: ${SECS}s of chaos"
  printf 'actions:'; for a in "${!actions[@]}"; do printf ' %s=%s' "$a" "${actions[$a]}"; done; echo
  echo "requests: $(cat "$TMP/load-$mode.json")"
  echo "primary fds: $fd_start -> $fd_end; primary RSS: ${rss_start} KiB -> ${rss_end} KiB"
  echo "workers expected: $expected; slots at the end:"
  curl -s "http://$admin/status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
for slot in s["slots"]:
    w = slot["worker"] or {}
    print("  slot %d: %s (pid %s, generation %s, failures %d)" % (slot["slot"], slot["state"], w.get("pid"), w.get("generation"), slot["failures"]))
'
  stop
  unset actions
done
