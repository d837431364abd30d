#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind
# (callgrind): unlike CPU time, the count barely moves with background load,
# so it compares two builds reliably on a busy machine.
#
#   bash bench/gateway/instructions.sh /path/to/meshwork-bench-gateway [CONNS] [SECS]
#
# Starts the benchmark upstream (13-byte responses) and the gateway (one
# worker thread) under callgrind, warms up, zeroes the counters, runs wrk
# for SECS (default 5) with CONNS connections (default 1: every request
# pays the full wake-up path), dumps the counters and prints the total and
# the count per request. Add CALLGRIND_KEEP=file to keep the profile
# (callgrind_annotate FILE).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/bench/gateway"
GW=${1:?usage: $0 GATEWAY_BIN [CONNS] [SECS]}
CONNS=${2:-1}
SECS=${3:-5}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
UP=${UPSTREAM_BIN:-$TARGET_DIR/release/meshwork-bench-upstream}
P_UP=18281 P_GW=18290
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
[ -x "$UP" ] || (cd "$ROOT" && cargo build --release -q -p meshwork-gateway --features mimalloc --bin meshwork-bench-upstream)

source "$HERE/lib.sh"

UPSTREAM_THREADS=1 "$UP" "127.0.0.1:$P_UP" 13 up >/dev/null & PIDS+=($!)
one_upstream_routes $P_UP
valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.out" "$GW" "127.0.0.1:$P_GW" "$TMP/routes.toml" 1 \
  >/dev/null 2>"$TMP/valgrind.log" & VPID=$!; PIDS+=($VPID)
for _ in $(seq 1 300); do curl -sf -o /dev/null "http://127.0.0.1:$P_GW/x" && break; sleep 0.1; done
wrk -t1 -c"$CONNS" -d3s "http://127.0.0.1:$P_GW/x" >/dev/null
callgrind_control -z "$VPID" >/dev/null
out=$(wrk -t1 -c"$CONNS" -d"${SECS}s" -s "$HERE/latency.lua" "http://127.0.0.1:$P_GW/x")
callgrind_control -d "$VPID" >/dev/null
# The dump is complete once its closing summary line is written.
dump=
for _ in $(seq 1 100); do
  dump=$(ls -t "$TMP"/cg.out.* 2>/dev/null | head -1 || true)
  [ -n "$dump" ] && grep -q '^summary: ' "$dump" && break
  sleep 0.1
done
grep -q '^summary: ' "$dump" || { echo "callgrind wrote no complete dump" >&2; exit 1; }
requests=$(echo "$out" | sed -n 's/^RESULT //p' | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
ir=$(sed -n 's/^summary: //p' "$dump")
[ -n "${CALLGRIND_KEEP:-}" ] && cp "$dump" "$CALLGRIND_KEEP"
echo "$(basename "$GW") conns=$CONNS requests=$requests instructions=$ir per_request=$((ir / requests))"
