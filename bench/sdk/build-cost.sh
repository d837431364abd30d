#!/usr/bin/env bash
# What an application that links only meshwork-sdk compiles: crates in its
# build graph (normal + build dependencies) and a clean debug build's wall time.
#
#   bench/sdk/build-cost.sh [REV...]     (default: HEAD)
#
# Each revision is checked out into a scratch worktree and built with a fresh
# target directory, one after the other (never two builds at once).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_INCREMENTAL=0
revs=("$@")
[ ${#revs[@]} -eq 0 ] && revs=(HEAD)
scratch=$(mktemp -d)
trap 'git worktree prune; rm -rf "$scratch"' EXIT
printf '%-12s %8s %10s\n' rev crates build_s
for rev in "${revs[@]}"; do
  wt="$scratch/$rev"
  git worktree add -q --detach "$wt" "$rev"
  crates=$(cd "$wt" && cargo tree -p meshwork-sdk -e normal,build --prefix none \
    | sed 's/ (\*)//' | sort -u | wc -l)
  start=$(date +%s.%N)
  (cd "$wt" && CARGO_TARGET_DIR="$scratch/target-$rev" cargo build -q -p meshwork-sdk)
  end=$(date +%s.%N)
  printf '%-12s %8s %10.0f\n' "$(git rev-parse --short "$rev")" "$crates" "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')"
  git worktree remove --force "$wt"
  rm -rf "$scratch/target-$rev"
done
