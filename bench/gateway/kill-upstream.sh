#!/usr/bin/env bash
# SIGKILL one of three upstream processes under wrk load, behind Meshwork's
# gateway (route defaults: no `retry` settings, default outlier detection)
# and behind nginx 1.22 (defaults: proxy_next_upstream error timeout,
# max_fails=1, fail_timeout=10s), in the same run, and count what the
# clients saw: wrk's socket errors and non-2xx/3xx responses.
#
#   RUNS=3 DURATION=6 KILL_AT=2 CONNS=32 bash bench/gateway/kill-upstream.sh
#
# Needs wrk and nginx (Debian packages). Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/gateway/lib.sh

RUNS=${RUNS:-3}
DURATION=${DURATION:-6}
KILL_AT=${KILL_AT:-2}
CONNS=${CONNS:-32}
UP_PORTS=(19101 19102 19103)
GW_PORT=19180
NGINX_PORT=19181

command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
command -v nginx >/dev/null || { echo "nginx is missing (apt-get install nginx)" >&2; exit 1; }
cargo build --release -q -p meshwork-gateway --bin meshwork-bench-upstream --example meshwork-bench-gateway
BIN=target/release

cat > "$TMP/routes.toml" <<TOML
[[routes]]
name = "bench"
match = { path = { prefix = "/" } }
[routes.forward]
upstreams = ["127.0.0.1:${UP_PORTS[0]}", "127.0.0.1:${UP_PORTS[1]}", "127.0.0.1:${UP_PORTS[2]}"]
TOML

nginx_conf <<NGINX
  upstream three {
    server 127.0.0.1:${UP_PORTS[0]};
    server 127.0.0.1:${UP_PORTS[1]};
    server 127.0.0.1:${UP_PORTS[2]};
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://three; }
  }
NGINX

# Starts the three upstreams; their PIDs in UP_PIDS.
start_upstreams() {
  UP_PIDS=()
  for i in 0 1 2; do
    "$BIN/meshwork-bench-upstream" "127.0.0.1:${UP_PORTS[$i]}" 13 "u$i" >/dev/null &
    UP_PIDS+=($!)
    PIDS+=($!)
  done
  for p in "${UP_PORTS[@]}"; do wait_port "$p"; done
}

stop() { kill "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }

# One run against the proxy on port $2 (name $1): prints "name errors requests".
one_run() {
  local name=$1 port=$2 out="$TMP/wrk-$1.txt"
  start_upstreams
  wrk -t2 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$port/" > "$out" &
  local wrk_pid=$!
  sleep "$KILL_AT"
  kill -9 "${UP_PIDS[2]}"
  wait "$wrk_pid" || true
  stop "${UP_PIDS[0]}" "${UP_PIDS[1]}"
  local requests socket non2xx
  requests=$(awk '/requests in/ {print $1}' "$out")
  socket=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$out")
  echo "$name $(( ${socket:-0} + ${non2xx:-0} )) ${requests:-0}"
}

echo "proxy errors requests (SIGKILL of 1 of 3 upstreams at ${KILL_AT}s of ${DURATION}s, $CONNS connections)"
for r in $(seq 1 "$RUNS"); do
  # Fresh proxies each run, so no ejection or max_fails state carries over.
  "$BIN/examples/meshwork-bench-gateway" "127.0.0.1:$GW_PORT" "$TMP/routes.toml" 1 >/dev/null &
  GW_PID=$!
  PIDS+=($GW_PID)
  wait_port "$GW_PORT"
  one_run meshwork "$GW_PORT"
  stop "$GW_PID"
  nginx -c "$TMP/nginx.conf" &
  NGINX_PID=$!
  PIDS+=($NGINX_PID)
  wait_port "$NGINX_PORT"
  one_run nginx "$NGINX_PORT"
  stop "$NGINX_PID"
done
