#!/usr/bin/env bash
# The cost of store auth: puts/s and p99 with auth off and on (every call
# carrying a simple token of the root user), Meshwork and Debian's etcd side
# by side, interleaved in one run on the same disk, fsync on, driven by the
# same generator (`meshwork bench kv`). Medians of REPS runs.
#
# Usage: bench/store/auth.sh
#   env: REPS=3 CLIENTS=100 CONNS=10 TOTAL=20000 BIN=target/release/meshwork ETCD=/usr/bin/etcd
# Only 127.0.0.1 ports; only the PIDs started here are killed; each run bounded by timeout.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}; ETCD=${ETCD:-/usr/bin/etcd}
REPS=${REPS:-3}; CLIENTS=${CLIENTS:-100}; CONNS=${CONNS:-10}; TOTAL=${TOTAL:-20000}
TMP=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"' EXIT
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
run() { # side mode
  local side=$1 mode=$2 port=23890 pid user=()
  rm -rf "$TMP/d"; mkdir -p "$TMP/d"
  if [ "$side" = meshwork ]; then
    "$BIN" server --data-dir "$TMP/d" --etcd-addr 127.0.0.1:$port --http-addr 127.0.0.1:0 \
      --roles store >/dev/null 2>"$TMP/server.log" & pid=$!
  else
    "$ETCD" --data-dir "$TMP/d" --listen-client-urls http://127.0.0.1:$port \
      --advertise-client-urls http://127.0.0.1:$port --listen-peer-urls http://127.0.0.1:23891 \
      --initial-advertise-peer-urls http://127.0.0.1:23891 \
      --initial-cluster default=http://127.0.0.1:23891 --log-level error >/dev/null 2>"$TMP/server.log" & pid=$!
  fi
  PIDS+=("$pid"); wait_port $port
  if [ "$mode" = on ]; then
    ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:$port user add root:rootpw >/dev/null
    ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:$port auth enable >/dev/null 2>&1
    user=(--user root:rootpw)
  fi
  local out
  out=$(timeout 300 "$BIN" bench kv --endpoints 127.0.0.1:$port --op put --clients "$CLIENTS" \
    --conns "$CONNS" --total "$TOTAL" --json "${user[@]}")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$side-$mode $(echo "$out" | sed -n 's/.*"throughput":\([0-9.]*\).*/\1/p') $(echo "$out" | sed -n 's/.*"p99_ms":\([0-9.]*\).*/\1/p') $(echo "$out" | sed -n 's/.*"errors":\([0-9]*\).*/\1/p')" | tee -a "$TMP/results"
}
echo "side-mode puts_per_s p99_ms errors"
for _ in $(seq "$REPS"); do
  for side in meshwork etcd; do for mode in off on; do run $side $mode; done; done
done
for label in meshwork-off meshwork-on etcd-off etcd-on; do
  echo "median $label $(awk -v l="$label" '$1==l{print $2}' "$TMP/results" | median) $(awk -v l="$label" '$1==l{print $3}' "$TMP/results" | median)"
done
