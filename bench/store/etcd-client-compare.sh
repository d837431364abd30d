#!/usr/bin/env bash
# Puts from two load generators against Meshwork's store and Debian's etcd,
# in one run, same disk, fsync on: a client we did not write, the `etcd-client`
# crate (bench/store/etcd-client-load, built with a system protoc: Debian's
# protobuf-compiler), and our own `meshwork bench kv`. Both put 256-byte values
# under 8-byte keys over a 10,000-key space. Reports puts/s, p50/p99 and server
# CPU per put (utime+stime of the server process over the run, from /proc).
#
# Usage: bench/store/etcd-client-compare.sh
#   env: REPS=3 CLIENTS=1000 CONNS=100 TOTAL=60000 GENS="etcd-client bench-kv"
#        BIN=target/release/meshwork ETCD=/usr/bin/etcd
# Only 127.0.0.1 ports; only the PIDs started here are killed; runs bounded by timeout.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
ETCD=${ETCD:-/usr/bin/etcd}
REPS=${REPS:-3}; CLIENTS=${CLIENTS:-1000}; CONNS=${CONNS:-100}; TOTAL=${TOTAL:-60000}
GENS=${GENS:-etcd-client bench-kv}
# shellcheck source=bench/store/lib.sh
. "$ROOT/bench/store/lib.sh"
build_load
load() { # gen port -> one line of JSON
  if [ "$1" = etcd-client ]; then
    timeout 300 "$LOAD" 127.0.0.1:"$2" "$CLIENTS" "$CONNS" "$TOTAL"
  else
    timeout 300 "$BIN" bench kv --endpoints 127.0.0.1:"$2" --op put --conns "$CONNS" \
      --clients "$CLIENTS" --total "$TOTAL" --key-space 10000 --json 2>/dev/null | tail -n 1
  fi
}
run_side() { # side rep gen
  local side=$1 rep=$2 gen=$3 pid port=23790
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
  local out; out=$(load "$gen" $port)
  local after; after=$(ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local cpu_us; cpu_us=$(awk -v a="$after" -v b="$before" -v hz="$HZ" -v n="$TOTAL" 'BEGIN{printf "%.1f", (a-b)/hz*1e6/n}')
  echo "$gen $side $rep $out cpu_us_per_put=$cpu_us" | tee -a "$TMP/results"
}
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
summary() { # medians per generator and side, and Meshwork/etcd ratios
  echo "generator side puts_per_s p99_ms cpu_us_per_put (medians of $REPS)"
  for gen in $GENS; do
    for side in meshwork etcd; do
      local rows; rows=$(grep "^$gen $side " "$TMP/results")
      local rate p99 cpu
      rate=$(echo "$rows" | { field puts_per_sec; echo "$rows" | field throughput; } | median)
      p99=$(echo "$rows" | field p99_ms | median)
      cpu=$(echo "$rows" | sed -n 's/.*cpu_us_per_put=\([0-9.]*\).*/\1/p' | median)
      echo "$gen $side $rate $p99 $cpu"
    done
  done | awk '{print} $2=="meshwork"{r=$3;p=$4;c=$5} $2=="etcd"{printf "%s meshwork/etcd %.2fx %.2fx %.2fx\n", $1, r/$3, p/$4, c/$5}'
}
for rep in $(seq "$REPS"); do
  for gen in $GENS; do
    run_side meshwork "$rep" "$gen"
    run_side etcd "$rep" "$gen"
  done
done
summary
