#!/usr/bin/env bash
# Runs the meshwork-resilience benches (ours and the peers, same process,
# same run) and prints the RESULTS.md tables. Run from the repository root.
set -euo pipefail
cargo bench -p meshwork-resilience --bench layers -- --warm-up-time 1 --measurement-time 2 "$@"
python3 bench/resilience/report.py target/criterion
