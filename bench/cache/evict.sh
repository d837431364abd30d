#!/usr/bin/env bash
# Fill-and-evict, side by side: the cache role and Debian's redis-server, each fresh,
# with the same maxmemory and allkeys-lru, filled with about three times that in
# 100-byte values by redis-benchmark; reports RSS against maxmemory (issue 17: RSS
# within 15 % of maxmemory plus a fixed overhead).
#
# Usage: bench/cache/evict.sh   env: MAXMEMORY=67108864 KEYS=3000000 BIN=... BUILD=0
# Results go to bench/results/cache-evict-<timestamp>/. Only 127.0.0.1 is used; only
# the PIDs started here are killed (on exit, by trap).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
MAXMEMORY=${MAXMEMORY:-67108864}
KEYS=${KEYS:-3000000}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/cache-evict-$STAMP
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshwork-cache-evict.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
if [[ ${BUILD:-1} != 0 ]]; then (cd "$ROOT" && CARGO_INCREMENTAL=0 cargo build --release -q -p meshwork); fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss() { awk '/VmRSS/{print $2}' /proc/"$1"/status; }
MP=$(free_port); RP=$(free_port)
printf '[cache]\nmaxmemory = %s\nmaxmemory_policy = "allkeys-lru"\n' "$MAXMEMORY" >"$WORK/cache.toml"
"$BIN" server --roles cache --cache-addr "127.0.0.1:$MP" --http-addr 127.0.0.1:0 --etcd-addr 127.0.0.1:0 \
  --data-dir "$WORK/node" --config "$WORK/cache.toml" >"$WORK/node.out" 2>"$WORK/node.err" &
PIDS+=($!); NODE=$!
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --maxmemory "$MAXMEMORY" \
  --maxmemory-policy allkeys-lru >"$WORK/redis.log" 2>&1 &
PIDS+=($!); REDIS=$!
for p in $MP $RP; do for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done; done
{ echo "date: $(date -u)"; echo "machine: $(nproc) cores, $(uname -r)"; echo "redis: $(redis-server --version)";
  echo "settings: maxmemory=$MAXMEMORY keys=$KEYS allkeys-lru, 100-byte values"; } >"$OUT/env.txt"
echo "| server | RSS at start | RSS after the fill | growth | growth / maxmemory | keys kept | evicted |" | tee "$OUT/table.md"
echo "|---|---:|---:|---:|---:|---:|---:|" | tee -a "$OUT/table.md"
for side in meshwork:$MP:$NODE redis:$RP:$REDIS; do
  IFS=: read -r name port pid <<<"$side"
  before=$(rss "$pid")
  redis-benchmark -p "$port" -t set -r "$KEYS" -n "$KEYS" -d 100 -P 16 -q >/dev/null 2>&1
  after=$(rss "$pid")
  keys=$(redis-cli -p "$port" dbsize)
  evicted=$(redis-cli -p "$port" info stats | tr -d '\r' | sed -n 's/^evicted_keys://p')
  python3 -c "b=$before;a=$after;m=$MAXMEMORY/1024;print(f'| $name | {b/1024:.0f} MiB | {a/1024:.0f} MiB | {(a-b)/1024:.0f} MiB | {(a-b)/m:.2f}x | $keys | ${evicted:-?} |')" | tee -a "$OUT/table.md"
done
echo "results in $OUT" >&2
