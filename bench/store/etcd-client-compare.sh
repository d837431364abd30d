#!/usr/bin/env bash
# Puts under a client we did not write: the `etcd-client` crate
# (bench/store/etcd-client-load, built with a system protoc: Debian's
# protobuf-compiler) drives Meshwork's store and Debian's etcd in turn, in one
# run, same disk, fsync on. Reports puts/s, p50/p99 and server CPU per put
# (utime+stime of the server process over the run, from /proc).
#
# Usage: bench/store/etcd-client-compare.sh
#   env: REPS=3 CLIENTS=1000 CONNS=100 TOTAL=60000 BIN=target/release/meshwork ETCD=/usr/bin/etcd
# Only 127.0.0.1 ports; only the PIDs started here are killed; runs bounded by timeout.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
ETCD=${ETCD:-/usr/bin/etcd}
REPS=${REPS:-3}; CLIENTS=${CLIENTS:-1000}; CONNS=${CONNS:-100}; TOTAL=${TOTAL:-60000}
LOADDIR=$ROOT/bench/store/etcd-client-load
export CARGO_TARGET_DIR=${LOAD_TARGET:-/tmp/etcd-client-load-target}
(cd "$LOADDIR" && cargo build --release -q)
LOAD=$CARGO_TARGET_DIR/release/etcd-client-load
TMP=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
HZ=$(getconf CLK_TCK)
run_side() { # side rep
  local side=$1 rep=$2 pid port=23790
  rm -rf "$TMP/$side"; mkdir -p "$TMP/$side"
  if [ "$side" = meshwork ]; then
    "$BIN" server --data-dir "$TMP/$side" --etcd-addr 127.0.0.1:$port --http-addr 127.0.0.1:0 \
      --roles store --quota-backend-bytes 8589934592 >/dev/null 2>"$TMP/$side.log" & pid=$!
  else
    "$ETCD" --data-dir "$TMP/$side" --listen-client-urls http://127.0.0.1:$port \
      --advertise-client-urls http://127.0.0.1:$port --listen-peer-urls http://127.0.0.1:23800 \
      --quota-backend-bytes 8589934592 >/dev/null 2>"$TMP/$side.log" & pid=$!
  fi
  PIDS+=("$pid"); wait_port $port
  local before; before=$(ticks "$pid")
  local out; out=$(timeout 300 "$LOAD" 127.0.0.1:$port "$CLIENTS" "$CONNS" "$TOTAL")
  local after; after=$(ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local cpu_us; cpu_us=$(awk -v a="$after" -v b="$before" -v hz="$HZ" -v n="$TOTAL" 'BEGIN{printf "%.1f", (a-b)/hz*1e6/n}')
  echo "$side $rep $out cpu_us_per_put=$cpu_us"
}
for rep in $(seq "$REPS"); do
  run_side meshwork "$rep"
  run_side etcd "$rep"
done
