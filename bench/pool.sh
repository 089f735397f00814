#!/usr/bin/env bash
# CPU pool comparison: one event loop serving /health while CPU-heavy
# requests saturate every core, three ways, side by side:
#   corral pool    (cargo example event_loop --mode pool)
#   blocking       (cargo example event_loop --mode blocking: work inline on the loop)
#   Node + Piscina (bench/peers/piscina/server.js)
# Each prints one JSON line; this script prints them together. Loopback only,
# bounded in time (about 3 x SECONDS plus build time).
#
# Usage: bench/pool.sh [SECONDS] [--overhead]
#   --overhead also runs the criterion per-task overhead bench (benches/pool.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=5
overhead=0
for arg in "$@"; do
  case "$arg" in
    --overhead) overhead=1 ;;
    *) seconds="$arg" ;;
  esac
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" >&2
cargo build --release -p corral --example event_loop >&2
(cd bench/peers/piscina && npm ci --no-audit --no-fund --loglevel=error >&2)

results=()
for mode in pool blocking; do
  results+=("$(timeout $((seconds + 60)) target/release/examples/event_loop --mode "$mode" --seconds "$seconds" 2>/dev/null | tail -n1)")
done
results+=("$(cd bench/peers/piscina && timeout $((seconds + 60)) node server.js --seconds "$seconds" | tail -n1)")

printf '%s\n' "${results[@]}"

if [ "$overhead" = 1 ]; then
  cargo bench -p corral --bench pool -- --warm-up-time 1 --measurement-time 3 2>/dev/null |
    grep -E '^pool_|time:' >&2
fi
