#!/usr/bin/env bash
# Cache benchmark, side by side in one run: the node's cache role vs Debian's
# redis-server 7.0 (no persistence), both driven by Debian's redis-benchmark with
# the same flags, test by test (each test on both before the next, so both share
# the machine's noise). The generator shares the cores with the servers.
#
# Usage: bench/cache/run.sh        (about a minute)
#   env: TESTS=set,get,incr,mset (issue 17 lists: set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,spop,zadd,zpopmin,lrange_100,mset) CLIENTS=50 N=300000 NP=2000000 (pipelined runs)
#        WORKERS=  (the cache's [cache] workers; empty = one per CPU)
#        BIN=target/release/meshwork BUILD=0 (skip cargo build)
# Results go to bench/results/cache-<timestamp>/. Only 127.0.0.1 is used; only the
# PIDs started here are killed (on exit, by trap).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
TESTS=${TESTS:-set,get,incr,mset}
CLIENTS=${CLIENTS:-50}
N=${N:-300000}
NP=${NP:-2000000}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/cache-$STAMP
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshwork-cache-bench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
if [[ ${BUILD:-1} != 0 ]]; then (cd "$ROOT" && CARGO_INCREMENTAL=0 cargo build --release -q -p meshwork); fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MP=$(free_port); RP=$(free_port)
CFG=$WORK/cache.toml; echo "[cache]" >"$CFG"; [[ -n ${WORKERS:-} ]] && echo "workers = $WORKERS" >>"$CFG"
"$BIN" server --roles cache --cache-addr "127.0.0.1:$MP" --http-addr 127.0.0.1:0 --etcd-addr 127.0.0.1:0 \
  --data-dir "$WORK/node" --config "$CFG" >"$WORK/node.out" 2>"$WORK/node.err" &
PIDS+=($!); NODE=$!
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
PIDS+=($!); REDIS=$!
for p in $MP $RP; do for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done; done
{ echo "date: $(date -u)"; echo "machine: $(nproc) cores, $(uname -r)"; echo "redis: $(redis-server --version)";
  echo "settings: tests=$TESTS clients=$CLIENTS n=$N np=$NP workers=${WORKERS:-cpus}"; } >"$OUT/env.txt"
rps() { tr '\r' '\n' | sed -n 's/^\(.*\): \([0-9.]*\) requests per second.*/x \2/p'; }
echo "| test | pipeline | meshwork rps | redis rps | ratio |" | tee "$OUT/table.md"
echo "|---|---:|---:|---:|---:|" | tee -a "$OUT/table.md"
for t in ${TESTS//,/ }; do
  for P in 1 16; do
    n=$N; [[ $P != 1 ]] && n=$NP
    m=$(redis-benchmark -p "$MP" -t "$t" -c "$CLIENTS" -n "$n" -P "$P" -q 2>/dev/null | rps | awk '{print $2}' | head -1)
    r=$(redis-benchmark -p "$RP" -t "$t" -c "$CLIENTS" -n "$n" -P "$P" -q 2>/dev/null | rps | awk '{print $2}' | head -1)
    echo "| $t | $P | ${m:-?} | ${r:-?} | $(python3 -c "print(f'{float(\"${m:-0}\")/float(\"${r:-1}\"):.2f}x')") |" | tee -a "$OUT/table.md"
  done
done
# Memory per key: one million 100-byte values on each side, into fresh servers (memory
# freed by the tests above would otherwise be reused and hide part of the growth).
kill -9 "$NODE" "$REDIS"; wait "$NODE" "$REDIS" 2>/dev/null || true
MP=$(free_port); RP=$(free_port)
"$BIN" server --roles cache --cache-addr "127.0.0.1:$MP" --http-addr 127.0.0.1:0 --etcd-addr 127.0.0.1:0 \
  --data-dir "$WORK/node2" --config "$CFG" >>"$WORK/node.out" 2>>"$WORK/node.err" &
PIDS+=($!); NODE=$!
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no >>"$WORK/redis.log" 2>&1 &
PIDS+=($!); REDIS=$!
for p in $MP $RP; do for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done; done
for side in meshwork:$MP:$NODE redis:$RP:$REDIS; do
  IFS=: read -r name port pid <<<"$side"
  before=$(awk '/VmRSS/{print $2}' /proc/"$pid"/status)
  redis-benchmark -p "$port" -t set -r 1000000 -n 2000000 -d 100 -P 16 -q >/dev/null 2>&1
  after=$(awk '/VmRSS/{print $2}' /proc/"$pid"/status)
  keys=$(redis-cli -p "$port" dbsize)
  echo "$name: $keys keys, RSS +$(( (after - before) / 1024 )) MiB, $(( (after - before) * 1024 / (keys > 0 ? keys : 1) )) bytes/key" | tee -a "$OUT/table.md"
done
echo "results in $OUT" >&2
