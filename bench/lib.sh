# Shared helpers of the benchmark scripts (sourced, not run).

TMP=$(mktemp -d)
PIDS=() # servers, each leading its own process group
BG=()   # other background jobs (load clients)
cleanup() {
  for p in "${BG[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# start NAME CMD... : starts a server in its own process group, waits for its
# "listening on http://" line, sets ADDR and SERVER_PID.
start() {
  local name=$1; shift
  setsid "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  for _ in $(seq 600); do
    ADDR=$(grep -o 'listening on http://[0-9.:]*' "$TMP/$name.out" | head -1 | sed 's|listening on http://||') || true
    [ -n "$ADDR" ] && return 0
    sleep 0.05
  done
  echo "$name did not start:" >&2; cat "$TMP/$name.err" >&2; exit 1
}

# stop: graceful stop of the last started server and its group.
stop() { kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }

# to_ms VALUE: wrk prints latencies as 812.00us, 1.23ms or 1.02s
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) printf "%.2f", v/1000; else if (v ~ /ms$/) printf "%.2f", v+0; else if (v ~ /s$/) printf "%.2f", v*1000; else print v }'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a/b }'; }

machine() { echo "$(nproc) cores, $(lscpu | sed -n 's/Model name:[ ]*//p'), $(uname -sr)"; }
