#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a time budget each and prints
# the executions and crashes per target.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60 s, every target)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Each target's corpus grows in fuzz/corpus/TARGET (seeded from
# fuzz/seeds/TARGET); a crash is saved in fuzz/artifacts/TARGET and is
# replayed with `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`.
set -euo pipefail

budget=${1:-60}
shift || true
case $budget in '' | *[!0-9]*) echo "fuzz.sh: the budget must be whole seconds, e.g. bench/fuzz.sh 60" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../fuzz"
if ! cargo +nightly fuzz --help >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz on the nightly toolchain is missing; install it with: cargo install cargo-fuzz" >&2
  exit 2
fi
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi

for target in "${targets[@]}"; do cargo +nightly fuzz build "$target"; done

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
total_execs=0
total_crashes=0
rows=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  before=$(find "artifacts/$target" -type f | wc -l)
  seeds=()
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  # A crash ends the run early with a non-zero status; it is counted below.
  cargo +nightly fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
    -max_total_time="$budget" -print_final_stats=1 >"$logs/$target.log" 2>&1 || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$target.log" | tail -1)
  execs=${execs:-0}
  crashes=$(( $(find "artifacts/$target" -type f | wc -l) - before ))
  per_s=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$target.log" | tail -1)
  per_s=${per_s:-0}
  rows+=("| \`$target\` | $budget | $execs | $per_s | $crashes |")
  total_execs=$((total_execs + execs))
  total_crashes=$((total_crashes + crashes))
  if [ "$crashes" -gt 0 ]; then
    echo "fuzz.sh: $target crashed; its log:" >&2
    tail -40 "$logs/$target.log" >&2
  fi
done

echo "Machine: $(nproc) cores, $(lscpu | sed -n 's/Model name:[ ]*//p'), $(uname -sr)"
echo "Command: bench/fuzz.sh $budget $*"
echo
echo "| target | seconds | executions | executions/s | crashes |"
echo "|---|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo "| **all** | | **$total_execs** | | **$total_crashes** |"
[ "$total_crashes" -eq 0 ]
