#!/usr/bin/env bash
# A/B of two Meshwork builds under the etcd-client load generator
# (bench/store/etcd-client-load; needs a system protoc), interleaved A, B, A,
# B, ... on the same disk, fsync on. Per run: puts/s, p99, server and
# generator CPU per put (/proc and time), server system calls and context
# switches per put (perf stat). Then the medians.
#
# Usage: bench/store/ab-puts.sh BIN_A BIN_B
#   env: REPS=5 CLIENTS=1000 CONNS=100 TOTAL=60000 LOAD_TARGET=/tmp/etcd-client-load-target
# Only 127.0.0.1 ports; only the PIDs started here are killed; runs bounded by timeout.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BIN_A BIN_B" >&2; exit 2; }
A=$(realpath "$1"); B=$(realpath "$2")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REPS=${REPS:-5}; CLIENTS=${CLIENTS:-1000}; CONNS=${CONNS:-100}; TOTAL=${TOTAL:-60000}
# shellcheck source=bench/store/lib.sh
. "$ROOT/bench/store/lib.sh"
build_load
command -v perf >/dev/null || { echo "needs perf (Debian: linux-perf)" >&2; exit 1; }
per_put() { awk -v v="$1" -v n="$TOTAL" 'BEGIN{printf "%.2f", v/n}'; }
run() { # label bin
  local label=$1 bin=$2 port=23790 pid sp
  rm -rf "$TMP/d"; mkdir -p "$TMP/d"
  "$bin" server --data-dir "$TMP/d" --etcd-addr 127.0.0.1:$port --http-addr 127.0.0.1:0 \
    --roles store --quota-backend-bytes 8589934592 >/dev/null 2>"$TMP/$label.log" & pid=$!
  PIDS+=("$pid"); wait_port $port
  perf stat -e raw_syscalls:sys_enter,context-switches -p "$pid" -o "$TMP/stat" & sp=$!
  local before; before=$(ticks "$pid")
  local out; out=$( { /usr/bin/time -f "%U %S" timeout 300 "$LOAD" 127.0.0.1:$port "$CLIENTS" "$CONNS" "$TOTAL"; } 2>&1 )
  local after; after=$(ticks "$pid")
  kill -INT "$sp"; wait "$sp" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local rate p99 gen sc cs
  rate=$(echo "$out" | sed -n 's/.*"puts_per_sec":\([0-9.]*\).*/\1/p')
  p99=$(echo "$out" | sed -n 's/.*"p99_ms":\([0-9.]*\).*/\1/p')
  gen=$(echo "$out" | tail -n 1 | awk -v n="$TOTAL" '{printf "%.1f", ($1+$2)*1e6/n}')
  sc=$(per_put "$(awk '/raw_syscalls/{gsub(",","",$1); print $1}' "$TMP/stat")")
  cs=$(per_put "$(awk '/context-switches/{gsub(",","",$1); print $1}' "$TMP/stat")")
  echo "$label $rate $p99 $(awk -v a="$after" -v b="$before" -v hz="$HZ" -v n="$TOTAL" 'BEGIN{printf "%.1f", (a-b)/hz*1e6/n}') $gen $sc $cs" | tee -a "$TMP/results"
}
echo "build puts_per_s p99_ms server_cpu_us gen_cpu_us server_syscalls cswitches (per put)"
for _ in $(seq "$REPS"); do run A "$A"; run B "$B"; done
for label in A B; do
  line="median-$label"
  for col in 2 3 4 5 6 7; do line="$line $(awk -v l="$label" -v c="$col" '$1==l{print $c}' "$TMP/results" | median)"; done
  echo "$line"
done
