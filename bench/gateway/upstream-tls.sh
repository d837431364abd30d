#!/usr/bin/env bash
# What TLS to the upstream costs, Meshwork's gateway and nginx side by side:
# wrk (64 connections, 13-byte answers) through each proxy to one nginx
# upstream, in clear and over TLS (certificate verified, chain and name; the
# proxies keep their upstream connections alive, so handshakes are rare and
# the cost is the record layer).
#
#   bash bench/gateway/upstream-tls.sh          # 10 s per cell
#   DURATION=30 bash bench/gateway/upstream-tls.sh
#
# Prints one JSON line per cell and a table (req/s, p50, p99, proxy CPU).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/bench/gateway"
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
THREADS=${WRK_THREADS:-2}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
P_UP=18181 P_UPS=18182 P_GW=18190 P_NGINX=18191

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need openssl; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx openssl >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
(cd "$ROOT" && cargo build --release -q -p meshwork-gateway --features mimalloc --example meshwork-bench-gateway)
GW="$TARGET_DIR/release/examples/meshwork-bench-gateway"

source "$HERE/lib.sh"

# A CA and the upstream's certificate (name upstream.local), made with openssl.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=bench CA" -keyout "$TMP/ca-key.pem" -out "$TMP/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj "/CN=upstream.local" -keyout "$TMP/up-key.pem" -out "$TMP/up.csr" 2>/dev/null
printf 'subjectAltName=DNS:upstream.local\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$TMP/ext.cnf"
openssl x509 -req -in "$TMP/up.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca-key.pem" -CAcreateserial \
  -days 2 -extfile "$TMP/ext.cnf" -out "$TMP/up.pem" 2>/dev/null

# The upstream: one nginx answering 13 bytes in clear and over TLS.
mkdir -p "$TMP/up"
cat > "$TMP/up/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $TMP/up/nginx.pid;
error_log $TMP/up/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $TMP/up/body;
  proxy_temp_path $TMP/up/proxy;
  fastcgi_temp_path $TMP/up/fastcgi;
  uwsgi_temp_path $TMP/up/uwsgi;
  scgi_temp_path $TMP/up/scgi;
  server { listen 127.0.0.1:$P_UP; location / { return 200 "hello world!\n"; } }
  server {
    listen 127.0.0.1:$P_UPS ssl;
    ssl_certificate $TMP/up.pem;
    ssl_certificate_key $TMP/up-key.pem;
    location / { return 200 "hello world!\n"; }
  }
}
NGINX
"$NGINX" -c "$TMP/up/nginx.conf" -p "$TMP/up" & PIDS+=($!)
wait_port $P_UP; wait_port $P_UPS

cat > "$TMP/routes.toml" <<TOML
[[routes]]
name = "plain"
match = { path = { prefix = "/plain" } }
[routes.forward]
upstreams = ["127.0.0.1:$P_UP"]

[[routes]]
name = "tls"
match = { path = { prefix = "/tls" } }
[routes.forward]
upstreams = ["127.0.0.1:$P_UPS"]
tls = { ca_file = "$TMP/ca.pem", server_name = "upstream.local" }
TOML
"$GW" "127.0.0.1:$P_GW" "$TMP/routes.toml" >/dev/null & GW_PID=$!; PIDS+=($GW_PID)

nginx_conf <<NGINX
  upstream plain { server 127.0.0.1:$P_UP; keepalive 512; keepalive_requests 1000000; }
  upstream tls { server 127.0.0.1:$P_UPS; keepalive 512; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$P_NGINX reuseport;
    location /plain { proxy_pass http://plain; }
    location /tls {
      proxy_pass https://tls;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $TMP/ca.pem;
      proxy_ssl_name upstream.local;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }
  }
NGINX
"$NGINX" -c "$TMP/nginx.conf" -p "$TMP" & NGINX_PID=$!; PIDS+=($NGINX_PID)
wait_port $P_GW; wait_port $P_NGINX

pids_of() { case $1 in meshwork) echo "$GW_PID" ;; nginx) echo "$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')" ;; esac; }
OUT="$TMP/results.jsonl"
for mode in plain tls; do
  for target in meshwork nginx; do
    port=$([ $target = meshwork ] && echo $P_GW || echo $P_NGINX)
    url="http://127.0.0.1:$port/$mode"
    body=$(curl -sf "$url") || { echo "$target /$mode does not answer" >&2; exit 1; }
    [ "$body" = "hello world!" ] || { echo "$target /$mode answered $body" >&2; exit 1; }
    wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null
    t0=$(cpu_total "$(pids_of $target)")
    res=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -s "$HERE/latency.lua" "$url" | sed -n 's/^RESULT //p')
    t1=$(cpu_total "$(pids_of $target)")
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v d="$DURATION" 'BEGIN { printf "%.0f", (b - a) / hz / d * 100 }')
    echo "$res" | sed "s/^{/{\"target\":\"$target\",\"mode\":\"$mode\",\"cpu_pct\":$cpu,/" | tee -a "$OUT"
  done
done

python3 - "$OUT" <<'PY'
import json, sys
rows = {(r["target"], r["mode"]): r for r in map(json.loads, open(sys.argv[1]))}
rps = lambda r: r["requests"] / (r["duration_us"] / 1e6)
print("| proxy | upstream | req/s | p50 | p99 | errors | proxy CPU |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for (t, m), r in sorted(rows.items()):
    print(f'| {t} | {m} | {rps(r):,.0f} | {r["p50"]} µs | {r["p99"]} µs | {r["errors"]} | {r["cpu_pct"]} % |')
for t in ("meshwork", "nginx"):
    p, s = rows[(t, "plain")], rows[(t, "tls")]
    print(f'{t}: TLS keeps {rps(s)/rps(p):.2f} of the cleartext req/s')
print(f'meshwork / nginx over TLS: {rps(rows[("meshwork","tls")])/rps(rows[("nginx","tls")]):.2f}')
PY
