#!/usr/bin/env bash
# h2c (HTTP/2 without TLS, prior knowledge) through the gateway and through
# nginx 1.22 to the same HTTP/1.1 upstream, measured with h2load (Debian's
# nghttp2-client), interleaved rounds, medians; CPU per request of each
# proxy from /proc/PID/stat.
#
#   bash bench/gateway/h2c.sh [GATEWAY_BIN]
#   ROUNDS=5 SECS=5 CONNS=16 STREAMS=10 SIZE=13 bash bench/gateway/h2c.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/bench/gateway"
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-5}
CONNS=${CONNS:-16}
STREAMS=${STREAMS:-10}
SIZE=${SIZE:-13}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
UP=${UPSTREAM_BIN:-$TARGET_DIR/release/meshwork-bench-upstream}
GW=${1:-$TARGET_DIR/release/examples/meshwork-bench-gateway}
P_UP=18481 P_NGINX=18491 P_GW=18492

command -v h2load >/dev/null || { echo "h2load is needed (apt-get install nghttp2-client)" >&2; exit 1; }
command -v nginx >/dev/null || { echo "nginx is needed (apt-get install nginx-light)" >&2; exit 1; }
[ -x "$UP" ] && [ -x "$GW" ] || (cd "$ROOT" && cargo build --release -q -p meshwork-gateway --features mimalloc --bin meshwork-bench-upstream --example meshwork-bench-gateway)

source "$HERE/lib.sh"

UPSTREAM_THREADS=1 "$UP" "127.0.0.1:$P_UP" "$SIZE" up >/dev/null & PIDS+=($!)
wait_port $P_UP
one_upstream_routes $P_UP
"$GW" "127.0.0.1:$P_GW" "$TMP/routes.toml" >/dev/null & gpid=$!; PIDS+=($gpid)
nginx_conf <<NGINX
  upstream up { server 127.0.0.1:$P_UP; keepalive 512; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$P_NGINX http2 reuseport;
    location / { proxy_pass http://up; }
  }
NGINX
nginx -c "$TMP/nginx.conf" -p "$TMP" & npid=$!; PIDS+=($npid)
wait_port $P_GW
wait_port $P_NGINX
NAMES=(meshwork nginx) PORTS=($P_GW $P_NGINX) TPIDS=("$gpid" "$npid $(pgrep -P "$npid" | tr '\n' ' ')")


: > "$TMP/rows"
for round in $(seq 1 "$ROUNDS"); do
  for i in "${!NAMES[@]}"; do
    url="http://127.0.0.1:${PORTS[$i]}/x"
    h2load -c "$CONNS" -m "$STREAMS" -D 1 "$url" >/dev/null
    read -r u0 s0 < <(cpu_ticks "${TPIDS[$i]}")
    out=$(h2load -c "$CONNS" -m "$STREAMS" -D "$SECS" "$url")
    read -r u1 s1 < <(cpu_ticks "${TPIDS[$i]}")
    rps=$(echo "$out" | sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p')
    ok=$(echo "$out" | sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p')
    fail=$(echo "$out" | sed -n 's/^requests: .* \([0-9]*\) failed.*/\1/p')
    echo "$round ${NAMES[$i]} $u0 $s0 $u1 $s1 ${rps:-0} ${ok:-0} ${fail:-0}" >> "$TMP/rows"
  done
done

python3 - "$TMP/rows" "$HZ" "$(uptime)" "$CONNS" "$STREAMS" "$SIZE" <<'PY'
import sys, statistics as st
hz = int(sys.argv[2])
rows, order = {}, []
for line in open(sys.argv[1]):
    rnd, name, u0, s0, u1, s1, rps, ok, fail = line.split()
    n = max(int(ok), 1)
    rec = dict(rps=float(rps), user=(int(u1) - int(u0)) / hz / n * 1e6,
               sys=(int(s1) - int(s0)) / hz / n * 1e6, fail=int(fail))
    if name not in rows:
        order.append(name)
    rows.setdefault(name, []).append(rec)
print(f"# h2c, {sys.argv[4]} connections x {sys.argv[5]} streams, {sys.argv[6]} B responses, "
      f"{len(next(iter(rows.values())))} rounds; load: {sys.argv[3].strip()}")
print("| proxy | req/s (median) | req/s (min–max) | user µs/req | kernel µs/req | failed |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name in order:
    rs = rows[name]
    med = lambda k: st.median(x[k] for x in rs)
    print(f"| {name} | {med('rps'):,.0f} | {min(x['rps'] for x in rs):,.0f}–{max(x['rps'] for x in rs):,.0f} | "
          f"{med('user'):.2f} | {med('sys'):.2f} | {sum(x['fail'] for x in rs)} |")
PY
