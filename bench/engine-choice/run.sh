#!/usr/bin/env bash
# Runs the redb vs fjall comparison: 3 rounds, each engine once per round (order alternates),
# every run in a fresh scratch dir under target/scratch (same disk as the repo), then prints
# the median table. Whole run takes ~1-2 minutes on the 2-core dev machine.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="$PWD/target"
cargo build --release --quiet
BIN=target/release/engine-choice
SCRATCH=target/scratch
RESULTS=${RESULTS:-results}
ROUNDS=${ROUNDS:-3}
mkdir -p "$SCRATCH" "$RESULTS"
rm -f "$RESULTS"/*.txt "$RESULTS"/loadavg.log
for n in $(seq 1 "$ROUNDS"); do
  if (( n % 2 )); then order="redb fjall"; else order="fjall redb"; fi
  for e in $order; do
    echo "== round $n: $e" >&2
    echo "round $n $e start: $(cut -d" " -f1-3 /proc/loadavg) (loadavg 1/5/15 min)" >> "$RESULTS/loadavg.log"
    "$BIN" run "$e" "$SCRATCH/$e-$n" > "$RESULTS/$e-$n.txt"
  done
done
"$BIN" summarize "$RESULTS" | tee "$RESULTS/summary.md"
