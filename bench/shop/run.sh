#!/usr/bin/env bash
# The demo shop end to end: orders per second through the gateway with p50/p99,
# and where the time goes (Meshwork: gateway + SDK, versus the services' own
# work). One release node with `--demo` (store, coordination and gateway in the
# node; order, inventory and payment as its child processes), driven by
# `meshwork demo load`, at each concurrency in $CONCURRENCY.
#
# Breakdown per order (from the services' own Prometheus metrics, deltas over
# each run, means):
#   L  = client latency (Little's law: concurrency / throughput)
#   O  = order service's server time for POST /orders
#   K  = its time inside SDK calls (pricing the order at inventory)
#   gateway and network = L - O;  pricing = K;  the TCC transaction = O - K
#   (start, the coordinator's calls to the branches, their answers, the wait)
#   branch handlers = server time of every branch call (try, confirm; the
#   three services summed, although the coordinator runs some in parallel)
# and CPU seconds per 1,000 orders of the node process and of each service.
#
# Usage: bench/shop/run.sh             env: ORDERS=5000 CONCURRENCY="16 64" WARMUP=500
#        BIN=target/release/meshwork BUILD=0 (skip cargo build)
# Output: bench/results/shop-<timestamp>/ (raw JSON, logs, table.md). Only 127.0.0.1 is
# used; only the PIDs this script starts are stopped (on exit, by trap).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
ORDERS=${ORDERS:-5000}
CONCURRENCY=${CONCURRENCY:-16 64}
WARMUP=${WARMUP:-500}
OUT=$ROOT/bench/results/shop-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
DATA=$(mktemp -d)
NODE_PID=
cleanup() {
  if [[ -n $NODE_PID ]] && kill -0 "$NODE_PID" 2>/dev/null; then
    kill -TERM "$NODE_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$NODE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$NODE_PID" 2>/dev/null || true
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT

if [[ ${BUILD:-1} != 0 ]]; then
  (cd "$ROOT" && cargo build --release -q -p meshwork)
fi

MESHWORK_LOG=warn "$BIN" server --data-dir "$DATA" --etcd-addr 127.0.0.1:0 \
  --http-addr 127.0.0.1:0 --gateway-addr 127.0.0.1:0 --roles store,coord,gateway,txn --demo \
  >"$OUT/node.out" 2>"$OUT/node.err" &
NODE_PID=$!
for _ in $(seq 1 600); do
  grep -q '^Demo: up' "$OUT/node.out" 2>/dev/null && break
  kill -0 "$NODE_PID" || { cat "$OUT/node.err"; exit 1; }
  sleep 0.1
done
grep -q '^Demo: up' "$OUT/node.out" || { echo "demo did not start" >&2; exit 1; }
HTTP=$(sed -n 's/^HTTP: http:\/\///p' "$OUT/node.out")
GW=$(sed -n 's/^Gateway: //p' "$OUT/node.out")

# Child PIDs by service, from the registry (each instance records its pid).
svc_field() { # service field
  curl -s "http://$HTTP/v1/services/$1/instances?healthy=true" |
    python3 -c "import json,sys; i=json.load(sys.stdin)['instances'][0]; print(i['metadata']['pid'] if '$2'=='pid' else f\"{i['address']}:{i['port']}\")"
}
declare -A PID ADDR
for s in order inventory payment; do
  PID[$s]=$(svc_field $s pid)
  ADDR[$s]=$(svc_field $s addr)
done

cpu() { # pid -> utime+stime in seconds
  awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15)/hz}' "/proc/$1/stat"
}
snapshot() { # name -> writes $OUT/<name>.json: metrics sums/counts and CPU
  {
    echo "{"
    echo "\"cpu\": {\"node\": $(cpu "$NODE_PID"), \"order\": $(cpu "${PID[order]}"), \"inventory\": $(cpu "${PID[inventory]}"), \"payment\": $(cpu "${PID[payment]}")},"
    echo "\"metrics\": {"
    local first=1
    for s in order inventory payment; do
      [[ $first == 1 ]] || echo ","
      first=0
      printf '"%s": ' "$s"
      curl -s "http://${ADDR[$s]}/metrics" | python3 -c '
import json, re, sys
out = {}
for line in sys.stdin:
    m = re.match(r"(meshwork_sdk_(?:server_request|call)_duration_seconds)_(sum|count)\{(.*)\} (\S+)", line)
    if m:
        name, kind, labels, v = m.groups()
        out[name + "{" + labels + "}_" + kind] = float(v)
print(json.dumps(out))'
    done
    echo "}}"
  } >"$OUT/$1.json"
}

echo "warm-up: $WARMUP orders" >&2
"$BIN" demo load --gateway "$GW" --orders "$WARMUP" --concurrency 16 --json >"$OUT/warmup.json"

for c in $CONCURRENCY; do
  echo "run: $ORDERS orders at concurrency $c" >&2
  snapshot "before-$c"
  "$BIN" demo load --gateway "$GW" --orders "$ORDERS" --concurrency "$c" --json >"$OUT/load-$c.json"
  snapshot "after-$c"
done

python3 - "$OUT" $CONCURRENCY <<'PY' | tee "$OUT/table.md"
import json, sys
out, conc = sys.argv[1], sys.argv[2:]
def load(n): return json.load(open(f"{out}/{n}.json"))
def pick(m, svc, name, pred, kind):
    return sum(v for k, v in m["metrics"][svc].items()
               if k.startswith(name + "{") and k.endswith("_" + kind) and pred(k))
print("| concurrency | orders/s | confirmed | p50 ms | p99 ms | L ms | gateway+net ms | pricing ms | transaction ms | branch handlers ms | CPU s/1k orders: node / order / inventory / payment |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for c in conc:
    a, b, r = load(f"before-{c}"), load(f"after-{c}"), load(f"load-{c}")
    n = r["orders"]
    d = lambda svc, name, pred, kind: pick(b, svc, name, pred, kind) - pick(a, svc, name, pred, kind)
    srv = "meshwork_sdk_server_request_duration_seconds"
    call = "meshwork_sdk_call_duration_seconds"
    is_post_orders = lambda k: 'route="/orders"' in k and 'method="POST"' in k
    is_branch = lambda k: 'method="POST"' in k and 'route="/orders"' not in k
    o_sum, o_cnt = d("order", srv, is_post_orders, "sum"), d("order", srv, is_post_orders, "count")
    k_sum = d("order", call, lambda k: True, "sum")
    b_sum = sum(d(svc, srv, is_branch, "sum") for svc in ["order", "inventory", "payment"])
    per = lambda x: x / max(o_cnt, 1) * 1000
    L = int(c) / r["rate_per_sec"] * 1000
    O, K, B = per(o_sum), per(k_sum), per(b_sum)
    cpu = {p: (b["cpu"][p] - a["cpu"][p]) / n * 1000 for p in ["node", "order", "inventory", "payment"]}
    print(f"| {c} | {r['rate_per_sec']:.0f} | {r['confirmed']}/{n} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {L:.1f} | {L - O:.1f} | {K:.1f} | {O - K:.1f} | {B:.1f} | {cpu['node']:.2f} / {cpu['order']:.2f} / {cpu['inventory']:.2f} / {cpu['payment']:.2f} |")
PY
echo "raw: $OUT" >&2
