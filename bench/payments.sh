#!/usr/bin/env bash
# Payments benchmark (apps/payments, clustered), loopback only, bounded time:
#  (a) settlement throughput, transactions/s, for a 100,000-line signed batch,
#      with 1 CPU-pool thread and with one per core: end to end over HTTP
#      (upload, verify, commit to SQLite or to --database's Postgres, answer)
#      and in-process (verify only, bench/src/bin/payments_verify.rs),
#      against the single-thread HMAC rate;
#  (b) /health p99 idle and while such batches run back to back;
#  (c) payments created per second (wrk, a unique Idempotency-Key each).
#
# Usage: bench/payments.sh [--database postgres://...] [SECONDS_PER_WRK_RUN]
#        (default 10 s; without --database the payments are kept in SQLite
#        under a fresh data dir, with it in that Postgres database, which the
#        runs share: settlement ids carry a per-run prefix so every run
#        settles every line)
# Env: ROUNDS (batches per pool size, default 3), CONNS (wrk connections for
#      payments, default 64), BATCH_CLIENTS (back-to-back batch senders in (b),
#      default 1). Needs wrk and curl (apt-get install -y wrk curl); builds
#      release binaries itself. Prints a Markdown summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
DATABASE=
if [ "${1:-}" = --database ]; then
  [ -n "${2:-}" ] || { echo "--database needs a URL, e.g. --database postgres://corral:corral@127.0.0.1:5432/corral_test" >&2; exit 2; }
  DATABASE=$2
  shift 2
fi
SECS=${1:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
BATCH_CLIENTS=${BATCH_CLIENTS:-1}
LINES=100000
BAD_EVERY=100 # 1% bad signatures, so the answer also lists errors
NPROC=$(nproc)

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is missing: apt-get install -y curl" >&2; exit 1; }
cargo build --release -q -p payments
cargo build --release -q -p corral-bench --bin payments_verify
PAY=target/release/payments
VERIFY=target/release/payments_verify
# shellcheck source=bench/lib.sh
source bench/lib.sh
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# start_pay NAME ARGS...: a payments cluster on a fresh data dir (and on
# --database when given).
DB_ARGS=()
[ -n "$DATABASE" ] && DB_ARGS=(--database "$DATABASE")
STORE=${DATABASE:+Postgres}
STORE=${STORE:-SQLite}
start_pay() {
  local name=$1; shift
  start "$name" "$PAY" --listen 127.0.0.1:0 --data-dir "$TMP/data-$name" "${DB_ARGS[@]}" "$@"
}

# Fresh batches: distinct ids per seed, and per pool size and run, since a
# Postgres database outlives each cluster (and this run), so that every
# batch of (a) settles every line.
echo "generating $((2 * ROUNDS)) batches of $LINES lines..." >&2
RUN="bench-$$-$(date +%s)"
for t in 1 "$NPROC"; do
  for s in $(seq "$ROUNDS"); do
    "$PAY" gen-batch --lines "$LINES" --bad-every "$BAD_EVERY" --seed "$s" --id-prefix "$RUN-$t" >"$TMP/batch$t-$s.csv"
  done
done
WANT_ACCEPTED=$((LINES - LINES / BAD_EVERY))

# post_batch FILE: synchronous settlement; prints the seconds it took.
post_batch() {
  local out
  out=$(curl -s -o "$TMP/answer.json" -w '%{http_code} %{time_total}' \
    -H 'content-type: text/csv' --data-binary @"$1" "http://$ADDR/v1/settlements")
  [ "${out%% *}" = 200 ] || { echo "settlement failed: $out $(head -c 300 "$TMP/answer.json")" >&2; exit 1; }
  echo "${out#* }"
}

# (a) end to end, one batch at a time, best and median of ROUNDS.
declare -A BEST MEDIAN
for t in 1 "$NPROC"; do
  start_pay "pool$t" --workers max --pool-threads "$t"
  rates=()
  for s in $(seq "$ROUNDS"); do
    secs=$(post_batch "$TMP/batch$t-$s.csv")
    grep -q "\"accepted\":$WANT_ACCEPTED," "$TMP/answer.json" \
      || { echo "unexpected answer: $(head -c 300 "$TMP/answer.json")" >&2; exit 1; }
    rates+=("$(awk -v n="$LINES" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')")
  done
  stop
  sorted=$(printf '%s\n' "${rates[@]}" | sort -n)
  BEST[$t]=$(echo "$sorted" | tail -1)
  MEDIAN[$t]=$(echo "$sorted" | sed -n "$(( (ROUNDS + 1) / 2 ))p")
done

# (a) in process: verify only.
VERIFY_JSON=$("$VERIFY" "$LINES" 5)
j() { echo "$VERIFY_JSON" | sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p"; }

# (b) /health latency, idle then with batches back to back.
health() { # prints "P50_MS P99_MS MAX_MS RPS"
  local out
  out=$(wrk -t1 -c8 -d"${SECS}s" --latency "http://$ADDR/health")
  echo "$(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")" \
       "$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")" \
       "$(to_ms "$(echo "$out" | awk '$1=="Latency" {print $4}')")" \
       "$(echo "$out" | awk '/Requests\/sec/ {print $2}')"
}
start_pay health --workers max
curl -s "http://$ADDR/health" >/dev/null
read -r IDLE_P50 IDLE_P99 IDLE_MAX IDLE_RPS < <(health)
: >"$TMP/batches_done"
for c in $(seq "$BATCH_CLIENTS"); do
  (
    while :; do
      for s in $(seq "$ROUNDS"); do
        # The first pass settles, later passes find the ids already settled;
        # every line's signature is verified either way.
        post_batch "$TMP/batch1-$s.csv" >/dev/null && echo >>"$TMP/batches_done"
      done
    done
  ) &
  BG+=("$!")
done
sleep 1 # let the first batch reach the pool
read -r BUSY_P50 BUSY_P99 BUSY_MAX BUSY_RPS < <(health)
for p in "${BG[@]}"; do kill "$p" 2>/dev/null || true; done
BATCHES=$(wc -l <"$TMP/batches_done")
BG=()
stop

# (c) payments created per second.
start_pay pay --workers max
curl -s "http://$ADDR/health" >/dev/null
PAY_OUT=$(RUN_ID=$$ wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s bench/payments_wrk.lua "http://$ADDR/v1/payments")
stop
PAY_RPS=$(echo "$PAY_OUT" | awk '/Requests\/sec/ {print $2}')
PAY_P99=$(to_ms "$(echo "$PAY_OUT" | awk '$1=="99%" {print $2}')")
PAY_BAD=$(echo "$PAY_OUT" | awk '/Non-2xx/ {print $5}')
PAY_ERR=$(echo "$PAY_OUT" | awk '/Socket errors/ {print}')

pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f%%", 100 * a / b }'; }
echo
echo "Machine: $NPROC cores, $(lscpu | sed -n 's/Model name:[ ]*//p'), $(uname -sr); load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Command: bench/payments.sh ${DATABASE:+--database URL }$SECS   (ROUNDS=$ROUNDS CONNS=$CONNS BATCH_CLIENTS=$BATCH_CLIENTS); store: $STORE"
echo
echo "(a) settlement of a $LINES-line batch (1% bad signatures) into $STORE, transactions/s"
echo
echo "| measure | 1 thread | $NPROC threads | parallel efficiency |"
echo "| --- | --- | --- | --- |"
echo "| HMAC-SHA256 alone (in-process) | $(j hmac_1thread_per_s) | | |"
echo "| check_line, parse + verify (in-process) | $(j check_line_1thread_per_s) | | |"
echo "| check_all, the service's checker (in-process, best of 5) | $(j check_all_1thread_per_s) | $(j check_all_all_threads_per_s) | $(pct "$(j check_all_all_threads_per_s)" "$(awk -v a="$(j check_all_1thread_per_s)" -v n="$NPROC" 'BEGIN{print a*n}')") vs ${NPROC}x 1 thread; $(pct "$(j check_all_all_threads_per_s)" "$(awk -v a="$(j hmac_1thread_per_s)" -v n="$NPROC" 'BEGIN{print a*n}')") vs ${NPROC}x HMAC alone |"
echo "| POST /v1/settlements end to end, --pool-threads N (best / median of $ROUNDS) | ${BEST[1]} / ${MEDIAN[1]} | ${BEST[$NPROC]} / ${MEDIAN[$NPROC]} | $(pct "${BEST[$NPROC]}" "$((BEST[1] * NPROC))") (best vs ${NPROC}x best 1 thread) |"
echo
echo "(b) /health under wrk -t1 -c8 -d${SECS}s, cluster --workers max"
echo
echo "| | p50 ms | p99 ms | max ms | req/s |"
echo "| --- | --- | --- | --- | --- |"
echo "| idle | $IDLE_P50 | $IDLE_P99 | $IDLE_MAX | $IDLE_RPS |"
echo "| $BATCH_CLIENTS client(s) posting $LINES-line batches back to back ($BATCHES batches done) | $BUSY_P50 | $BUSY_P99 | $BUSY_MAX | $BUSY_RPS |"
echo
echo "(c) payments created into $STORE: wrk -t2 -c$CONNS -d${SECS}s, unique Idempotency-Key per request, --workers max"
echo
echo "| payments/s | p99 ms | non-2xx | socket errors |"
echo "| --- | --- | --- | --- |"
echo "| $PAY_RPS | $PAY_P99 | ${PAY_BAD:-0} | ${PAY_ERR:-none} |"
