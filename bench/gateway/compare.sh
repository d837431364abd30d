#!/usr/bin/env bash
# Back-to-back comparison of gateway builds (and nginx) on CPU per request:
# short wrk runs, interleaved round by round so that background load hits
# every target alike; reports the median of the rounds.
#
#   bash bench/gateway/compare.sh NAME=/path/to/meshwork-bench-gateway [NAME=...]
#   ROUNDS=7 SECS=5 CONNS=64 SIZE=13 bash bench/gateway/compare.sh before=/tmp/a after=/tmp/b
#
# Per target and round: requests/s (wrk -t2), user and kernel CPU of the
# proxy per request from /proc/PID/stat (utime, stime over the run), and
# wrk's p50; and, for the arithmetic of what the cores can give, the CPU per
# request of the upstream and of wrk itself (children's times of this
# shell). nginx (Debian's package, same settings as run.sh) is always
# one of the targets; set NGINX=0 to leave it out.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/bench/gateway"
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-5}
CONNS=${CONNS:-64}
SIZE=${SIZE:-13}
THREADS=${WRK_THREADS:-2}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
UP=${UPSTREAM_BIN:-$TARGET_DIR/release/meshwork-bench-upstream}
P_UP=18181 P_NGINX=18191 P_FIRST_GW=18192

[ $# -ge 1 ] || { echo "usage: $0 NAME=GATEWAY_BIN [NAME=GATEWAY_BIN...]" >&2; exit 2; }
[ -x "$UP" ] || (cd "$ROOT" && cargo build --release -q -p meshwork-gateway --features mimalloc --bin meshwork-bench-upstream)

source "$HERE/lib.sh"

UPSTREAM_THREADS=1 "$UP" "127.0.0.1:$P_UP" "$SIZE" up >/dev/null & UPID=$!; PIDS+=($UPID)
wait_port $P_UP
one_upstream_routes $P_UP

NAMES=() PORTS=() TPIDS=()
port=$P_FIRST_GW
for arg in "$@"; do
  name=${arg%%=*} bin=${arg#*=}
  "$bin" "127.0.0.1:$port" "$TMP/routes.toml" >/dev/null & pid=$!; PIDS+=($pid)
  NAMES+=("$name") PORTS+=($port) TPIDS+=("$pid")
  port=$((port + 1))
done
if [ "${NGINX:-1}" != 0 ]; then
  nginx_conf <<NGINX
  upstream up { server 127.0.0.1:$P_UP; keepalive 512; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$P_NGINX reuseport;
    location / { proxy_pass http://up; }
  }
NGINX
  nginx -c "$TMP/nginx.conf" -p "$TMP" & npid=$!; PIDS+=($npid)
  wait_port $P_NGINX
  NAMES+=(nginx) PORTS+=($P_NGINX) TPIDS+=("$npid $(pgrep -P "$npid" | tr '\n' ' ')")
fi
for p in "${PORTS[@]}"; do wait_port "$p"; done


: > "$TMP/rows"
for round in $(seq 1 "$ROUNDS"); do
  for i in "${!NAMES[@]}"; do
    url="http://127.0.0.1:${PORTS[$i]}/x"
    curl -sf -o /dev/null "$url" || { echo "${NAMES[$i]} does not answer" >&2; exit 1; }
    wrk -t"$THREADS" -c"$CONNS" -d1s "$url" >/dev/null
    read -r u0 s0 < <(cpu_ticks "${TPIDS[$i]}")
    read -r uu0 us0 < <(cpu_ticks "$UPID")
    read -r wu0 ws0 < <(awk '{print $16, $17}' "/proc/$$/stat")
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" -s "$HERE/latency.lua" "$url")
    read -r wu1 ws1 < <(awk '{print $16, $17}' "/proc/$$/stat")
    read -r uu1 us1 < <(cpu_ticks "$UPID")
    read -r u1 s1 < <(cpu_ticks "${TPIDS[$i]}")
    res=$(echo "$out" | sed -n 's/^RESULT //p')
    echo "$round ${NAMES[$i]} $u0 $s0 $u1 $s1 $((uu1 + us1 - uu0 - us0)) $((wu1 + ws1 - wu0 - ws0)) $res" >> "$TMP/rows"
  done
done

python3 - "$TMP/rows" "$HZ" "$(uptime)" <<'PY'
import json, sys, statistics as st
hz = int(sys.argv[2])
rows = {}
order = []
for line in open(sys.argv[1]):
    rnd, name, u0, s0, u1, s1, upt, wrkt, res = line.split(" ", 8)
    r = json.loads(res)
    n = r["requests"]
    secs = r["duration_us"] / 1e6
    rec = dict(rps=n / secs,
               user=(int(u1) - int(u0)) / hz / n * 1e6,
               sys=(int(s1) - int(s0)) / hz / n * 1e6,
               up=int(upt) / hz / n * 1e6, wrk=int(wrkt) / hz / n * 1e6,
               p50=r["p50"], errors=r["errors"])
    if name not in rows:
        order.append(name)
    rows.setdefault(name, []).append(rec)
print(f"# {len(next(iter(rows.values())))} rounds; load: {sys.argv[3].strip()}")
print("| target | req/s (median) | req/s (min–max) | user µs/req | kernel µs/req | upstream µs/req | wrk µs/req | p50 µs | errors |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name in order:
    rs = rows[name]
    med = lambda k: st.median(x[k] for x in rs)
    print(f"| {name} | {med('rps'):,.0f} | {min(x['rps'] for x in rs):,.0f}–{max(x['rps'] for x in rs):,.0f} | "
          f"{med('user'):.2f} | {med('sys'):.2f} | {med('up'):.2f} | {med('wrk'):.2f} | {med('p50'):.0f} | {sum(x['errors'] for x in rs)} |")
PY
