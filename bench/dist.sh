#!/usr/bin/env bash
# Builds the release binary users install (profile `dist`), splits its
# debug info into meshwork.debug (linked back with a GNU debuglink, so gdb and
# backtraces symbolizers find it) and prints the sizes, next to the peers'
# binaries installed on this machine for comparison.
# Usage: bench/dist.sh [OUT_DIR]   (default target/dist-out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/dist-out}"
mkdir -p "$out"
CARGO_INCREMENTAL=0 cargo build --profile dist -p meshwork --bin meshwork
cp target/dist/meshwork "$out/meshwork.full"
objcopy --only-keep-debug "$out/meshwork.full" "$out/meshwork.debug"
objcopy --strip-all --add-gnu-debuglink="$out/meshwork.debug" "$out/meshwork.full" "$out/meshwork"
size() { stat -c %s "$1"; }
printf '%-40s %12s\n' binary bytes
printf '%-40s %12s\n' "meshwork (shipped, stripped)" "$(size "$out/meshwork")"
printf '%-40s %12s\n' "meshwork.debug (split debug info)" "$(size "$out/meshwork.debug")"
printf '%-40s %12s\n' "target/release/meshwork (release)" "$( [ -f target/release/meshwork ] && size target/release/meshwork || echo -)"
for peer in /usr/bin/etcd /usr/sbin/nginx /usr/bin/redis-server /usr/sbin/nats-server /usr/bin/prometheus; do
  [ -f "$peer" ] && printf '%-40s %12s\n' "$peer" "$(size "$(readlink -f "$peer")")"
done
"$out/meshwork" version
