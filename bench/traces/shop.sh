#!/usr/bin/env bash
# The demo shop's throughput and latency with tracing on (every request
# sampled: gateway, services and transaction coordinator export to the node's
# trace store) against tracing off (no traces role: no exporter anywhere),
# alternating rounds on fresh nodes in one run. Usage: bench/traces/shop.sh
# [ROUNDS] [ORDERS]; needs a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/meshwork}
ROUNDS=${1:-3}
ORDERS=${2:-3000}
cpu() { # CPU seconds (user + system) of the given pids
  local t=0
  for p in "$@"; do
    t=$(python3 -c "import os; f=open('/proc/$p/stat').read().rsplit(')',1)[1].split(); print($t + (int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))")
  done
  echo "$t"
}
run() { # $1 = on|off
  local dir; dir=$(mktemp -d)
  local extra=()
  if [ "$1" = on ]; then extra=(--otlp-http-addr 127.0.0.1:0); fi
  "$BIN" server --data-dir "$dir" --etcd-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --gateway-addr 127.0.0.1:18090 "${extra[@]}" --demo > "$dir/out" 2>/dev/null &
  local pid=$!
  for _ in $(seq 1 120); do grep -q "Demo: up" "$dir/out" 2>/dev/null && break; sleep 0.5; done
  # Warm-up, then the measured run; CPU seconds of the node and its children
  # (the shop's services) around it: the cost per order, less noisy than the rate.
  "$BIN" demo load --gateway http://127.0.0.1:18090 --orders 300 --json > /dev/null
  local pids="$pid $(pgrep -P "$pid" | tr '\n' ' ')"
  local c0; c0=$(cpu $pids)
  local r; r=$("$BIN" demo load --gateway http://127.0.0.1:18090 --orders "$ORDERS" --concurrency 32 --json)
  local c1; c1=$(cpu $pids)
  local cpu_ms; cpu_ms=$(python3 -c "print('%.2f' % (($c1 - $c0) * 1000.0 / $ORDERS))")
  local spans="-"
  if [ "$1" = on ]; then
    local http; http=$(sed -n 's/^HTTP: http:\/\///p' "$dir/out")
    sleep 1.5
    spans=$(curl -s "http://$http/v1/traces/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["spans"])')
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  echo "$r" | python3 -c "import json,sys; r=json.load(sys.stdin); print('tracing=$1 orders/s=%.1f p50=%.1f ms p99=%.1f ms confirmed=%d/%d cpu_ms_per_order=$cpu_ms spans=$spans' % (r['rate_per_sec'], r['p50_ms'], r['p99_ms'], r['confirmed'], r['orders']))"
}
for i in $(seq 1 "$ROUNDS"); do run off; run on; done
