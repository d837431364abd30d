#!/usr/bin/env bash
# Side-by-side HTTP proxy benchmark: wrk against the upstream directly,
# Meshwork's gateway and nginx (Debian's package), same upstream, same run.
#
#   bash bench/gateway/run.sh            # 10 s per cell
#   DURATION=30 bash bench/gateway/run.sh
#
# Cells: {direct, meshwork, nginx} x {64, 256 connections} x {13 B, 64 KiB}
# responses. Reports requests/s, p50/p99/p99.9 latency (wrk, with
# bench/gateway/latency.lua), CPU of the proxy (utime+stime over the run,
# % of one core) and its RSS after the run (nginx: master + workers).
# Keep-alive to the upstream on both proxies, access logs off on both,
# nginx `worker_processes auto`, the gateway with one single-threaded worker
# per core (`spawn_workers`, SO_REUSEPORT) and mimalloc.
# Writes bench/gateway/RESULTS.md (the table) and results.jsonl (raw).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/bench/gateway"
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
THREADS=${WRK_THREADS:-2}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
P_SMALL=18081 P_BIG=18082 P_GW=18090 P_NGINX=18091

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
  echo "installing wrk and nginx from Debian's packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

(cd "$ROOT" && cargo build --release -q -p meshwork-gateway --features mimalloc --bin meshwork-bench-upstream --bin meshwork-bench-gateway)
UP="$TARGET_DIR/release/meshwork-bench-upstream"
GW="$TARGET_DIR/release/meshwork-bench-gateway"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 did not open" >&2; exit 1
}

UPSTREAM_THREADS=1 "$UP" "127.0.0.1:$P_SMALL" 13 small >/dev/null & PIDS+=($!)
UPSTREAM_THREADS=1 "$UP" "127.0.0.1:$P_BIG" 65536 big >/dev/null & PIDS+=($!)
wait_port $P_SMALL; wait_port $P_BIG

cat > "$TMP/routes.toml" <<TOML
[[routes]]
name = "small"
match = { path = { prefix = "/small" } }
[routes.forward]
upstreams = ["127.0.0.1:$P_SMALL"]

[[routes]]
name = "big"
match = { path = { prefix = "/big" } }
[routes.forward]
upstreams = ["127.0.0.1:$P_BIG"]
TOML
"$GW" "127.0.0.1:$P_GW" "$TMP/routes.toml" >/dev/null & GW_PID=$!; PIDS+=($GW_PID)

mkdir -p "$TMP/nginx"
cat > "$TMP/nginx.conf" <<NGINX
worker_processes auto;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  keepalive_requests 1000000;
  upstream small { server 127.0.0.1:$P_SMALL; keepalive 512; keepalive_requests 1000000; }
  upstream big { server 127.0.0.1:$P_BIG; keepalive 512; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffers 16 16k;
  proxy_buffer_size 16k;
  server {
    listen 127.0.0.1:$P_NGINX reuseport;
    location /small { proxy_pass http://small; }
    location /big { proxy_pass http://big; }
  }
}
NGINX
"$NGINX" -c "$TMP/nginx.conf" -p "$TMP" & NGINX_PID=$!; PIDS+=($NGINX_PID)
wait_port $P_GW; wait_port $P_NGINX

# CPU ticks (utime+stime) of a process and its children threads/processes.
pids_of() { # name -> pid list
  case $1 in
    direct) echo "${PIDS[0]} ${PIDS[1]}" ;;
    meshwork) echo "$GW_PID" ;;
    nginx) echo "$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')" ;;
  esac
}
ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
rss_kib() { local r=0; for p in $1; do r=$((r + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $r; }
HZ=$(getconf CLK_TCK)

url_of() { # target size -> url
  local port
  case $1 in direct) [ "$2" = small ] && port=$P_SMALL || port=$P_BIG ;; meshwork) port=$P_GW ;; nginx) port=$P_NGINX ;; esac
  echo "http://127.0.0.1:$port/$2"
}

: > "$HERE/results.jsonl"
for size in small big; do
  for conns in 64 256; do
    for target in direct meshwork nginx; do
      url=$(url_of $target $size)
      curl -sf -o /dev/null "$url" || { echo "$target $url does not answer" >&2; exit 1; }
      wrk -t"$THREADS" -c"$conns" -d"${WARMUP}s" "$url" >/dev/null
      pids=$(pids_of $target)
      t0=$(ticks "$pids")
      out=$(wrk -t"$THREADS" -c"$conns" -d"${DURATION}s" -s "$HERE/latency.lua" "$url")
      t1=$(ticks "$(pids_of $target)")
      res=$(echo "$out" | sed -n 's/^RESULT //p')
      cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v d="$DURATION" 'BEGIN { printf "%.0f", (b - a) / hz / d * 100 }')
      rss=$(rss_kib "$(pids_of $target)")
      line=$(echo "$res" | sed "s/^{/{\"target\":\"$target\",\"size\":\"$size\",\"conns\":$conns,\"cpu_pct\":$cpu,\"rss_kib\":$rss,/")
      echo "$line" | tee -a "$HERE/results.jsonl"
    done
  done
done

python3 - "$HERE/results.jsonl" "$HERE/RESULTS.md" "$DURATION" <<'PY'
import json, sys, datetime, platform, subprocess
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
dur = sys.argv[3]
def rps(r): return r["requests"] / (r["duration_us"] / 1e6)
def us(v): return f"{v/1000:.2f} ms" if v >= 1000 else f"{v} µs"
nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
out = ["# Gateway benchmark results", "",
       f"Generated by `bash bench/gateway/run.sh` on {datetime.date.today()} ({platform.machine()}, "
       f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, {nginx_v}), "
       f"wrk -t2, {dur} s per cell after a warm-up; everything (wrk, proxies, upstream) on the same machine.", "",
       "| size | conns | target | req/s | p50 | p99 | p99.9 | errors | proxy CPU | proxy RSS |",
       "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for r in rows:
    size = "13 B" if r["size"] == "small" else "64 KiB"
    cpu = f'{r["cpu_pct"]} %' if r["target"] != "direct" else "(upstream)"
    rss = f'{r["rss_kib"]/1024:.1f} MiB' if r["target"] != "direct" else "(upstream)"
    out.append(f'| {size} | {r["conns"]} | {r["target"]} | {rps(r):,.0f} | {us(r["p50"])} | {us(r["p99"])} | {us(r["p999"])} | {r["errors"]} | {cpu} | {rss} |')
out += ["", "## Ratios", "", "| size | conns | meshwork / nginx req/s | meshwork p99 / nginx p99 | added p50 over direct (meshwork) | added p50 over direct (nginx) |",
        "| --- | --- | ---: | ---: | ---: | ---: |"]
by = {(r["size"], r["conns"], r["target"]): r for r in rows}
for size in ("small", "big"):
    for conns in (64, 256):
        d, m, n = (by.get((size, conns, t)) for t in ("direct", "meshwork", "nginx"))
        if not (d and m and n): continue
        out.append(f'| {"13 B" if size == "small" else "64 KiB"} | {conns} | {rps(m)/rps(n):.2f} | {m["p99"]/max(n["p99"],1):.2f} | {us(m["p50"]-d["p50"])} | {us(n["p50"]-d["p50"])} |')
import os
analysis = os.path.join(os.path.dirname(sys.argv[2]), "ANALYSIS.md")
if os.path.exists(analysis):
    out += ["", open(analysis).read().rstrip()]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
