#!/usr/bin/env bash
# Failed requests around a `kill -9` of one worker, per balancing mode: for
# each mode, TRIALS trials of `hello` with 2 workers under a bounded load of
# new and keep-alive connections (bench/src/bin/chaos_load.rs: 16 threads
# from 16 loopback addresses, half of them keep-alive, 3 s timeout per
# request; a request on a kept-alive connection that the server closed
# while idle is retried once on a new connection, as HTTP clients do). One
# second in, a worker is killed; the trial checks that it died (its pid is
# gone) and that a replacement pid appeared. Failures are counted apart for
# requests started before and after the kill.
#
# Usage: bench/kill_loss.sh [TRIALS] [MODES...]
#   (default 10 trials of reuseport round-robin least-conn sticky sticky-proxy;
#    sticky-proxy is sticky with --proxy-protocol; each trial lasts ~3 s)
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${1:-10}
shift || true
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(reuseport round-robin least-conn sticky sticky-proxy)
LOAD_SECS=${LOAD_SECS:-2}
THREADS=${THREADS:-16}
cargo build --release -q -p corral --example hello
cargo build --release -q -p corral-bench --bin chaos_load
HELLO=target/release/examples/hello
LOAD=target/release/chaos_load
# shellcheck source=bench/lib.sh
source bench/lib.sh

now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo "${t:0:-3}"; }
# failed JSON_PART: the number of outcomes other than "ok" in {"kind": n, ...}
failed() { python3 -c 'import json,sys; print(sum(v for k, v in json.loads(sys.argv[1]).items() if k != "ok"))' "$1"; }
part() { python3 -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])[sys.argv[2]]))' "$1" "$2"; }

declare -A AFTER BEFORE TOTAL_AFTER NOTES
for mode in "${MODES[@]}"; do
  flags=(--balance "$mode")
  load_flags=(--sources "$THREADS" --retry-stale)
  if [ "$mode" = sticky-proxy ]; then
    flags=(--balance sticky --proxy-protocol)
    load_flags+=(--proxy-protocol)
  fi
  for trial in $(seq "$TRIALS"); do
    start "$mode-$trial" "$HELLO" --listen 127.0.0.1:0 --workers 2 "${flags[@]}"
    primary=$SERVER_PID
    for _ in $(seq 100); do
      [ "$(pgrep -P "$primary" | wc -l)" -ge 2 ] && break
      sleep 0.05
    done
    sleep 0.3
    mark=$TMP/mark-$mode-$trial
    "$LOAD" "$ADDR" "$LOAD_SECS" "$THREADS" "${load_flags[@]}" --mark "$mark" >"$TMP/load.json" &
    load_pid=$!
    BG+=("$load_pid")
    sleep 1
    mapfile -t before < <(pgrep -P "$primary")
    victim=${before[0]}
    kill -KILL "$victim"
    # Taken after kill(2) returned (no fork: bash's own clock): from here
    # the victim runs no more code, so a request started later was started
    # after the kill.
    now_ms >"$mark"
    # Proof: the victim is gone and a replacement pid serves its slot.
    died=no replaced=no
    for _ in $(seq 100); do
      if [ "$died" = no ] && ! kill -0 "$victim" 2>/dev/null; then died=yes; fi
      for pid in $(pgrep -P "$primary"); do
        [[ " ${before[*]} " == *" $pid "* ]] || replaced=$pid
      done
      [ "$died" = yes ] && [ "$replaced" != no ] && break
      sleep 0.05
    done
    wait "$load_pid" || true
    stop
    if [ "$died" = no ] || [ "$replaced" = no ]; then
      echo "$mode trial $trial: the kill did not take (died=$died replaced=$replaced); not counted" >&2
      NOTES[$mode]="${NOTES[$mode]:-}x"
      continue
    fi
    out=$(cat "$TMP/load.json")
    a=$(failed "$(part "$out" after)"); b=$(failed "$(part "$out" before)")
    n=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["after"].get("ok", 0))' "$out")
    AFTER[$mode]="${AFTER[$mode]:+${AFTER[$mode]}, }$a"
    BEFORE[$mode]="${BEFORE[$mode]:+${BEFORE[$mode]}, }$b"
    TOTAL_AFTER[$mode]=$(( ${TOTAL_AFTER[$mode]:-0} + n ))
    echo "$mode trial $trial: killed $victim, replaced by $replaced; failed after/before the kill: $a/$b; $out" >&2
  done
done

echo
echo "Machine: $(machine)"
echo "Command: bench/kill_loss.sh $TRIALS ${MODES[*]}   (hello, 2 workers; chaos_load ${LOAD_SECS}s, $THREADS threads from $THREADS addresses, half keep-alive; kill -9 of one worker 1 s in)"
echo
echo "| balance | failed requests started after the kill, per trial | failed before the kill | requests answered after the kill (all trials) |"
echo "|---|---|---|---:|"
for mode in "${MODES[@]}"; do
  label=$mode
  [ "$mode" = sticky-proxy ] && label="sticky --proxy-protocol"
  [ "$mode" = sticky ] && label="sticky (kernel-steered)"
  skipped=${NOTES[$mode]:-}
  echo "| $label | ${AFTER[$mode]:-none} | ${BEFORE[$mode]:-none} | ${TOTAL_AFTER[$mode]:-0}${skipped:+ (${#skipped} trials not counted: the kill did not take)} |"
done
