#!/usr/bin/env bash
# Message queue benchmark, side by side in one run: a Meshwork node's embedded broker
# vs. Debian's nats-server 2.9 JetStream (file storage, one replica), both driven by
# `meshwork bench mq` through the same SDK API (meshwork_sdk::mq), phase by phase so
# both sides share the machine's noise.
#
# Durability differs, and the run shows both ways: the Meshwork broker acknowledges a
# publish after its fdatasync (group commit); nats-server 2.9 acknowledges after the
# write() and syncs its files every 2 minutes (it has no `sync_interval`/`sync: always`
# option yet: 2.9.10 refuses the field). So the node runs twice: as shipped (fsync)
# and with --unsafe-no-fsync (nats-server's own durability), against the same nats-server.
#
# Usage: bench/mq/run.sh          (about 4 minutes on 2 cores)
#   env: SECONDS_PER_RUN=10 PUBLISHERS=1,64 CONSUME=50000 CONCURRENCY=64 RATE=500
#        BACKLOG=1000000 (0 skips the RSS-with-backlog phase) SIZE=1024
#        BIN=target/release/meshwork NATS=/usr/sbin/nats-server BUILD=0 (skip cargo build)
#
# Raw JSON and logs go to bench/results/mq-<timestamp>/. Only 127.0.0.1 is used; only the
# PIDs this script starts are killed (on exit, by trap); temp dirs are removed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
NATS=${NATS:-/usr/sbin/nats-server}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
PUBLISHERS=${PUBLISHERS:-1,64}
CONSUME=${CONSUME:-50000}
CONCURRENCY=${CONCURRENCY:-64}
RATE=${RATE:-500}
BACKLOG=${BACKLOG:-1000000}
SIZE=${SIZE:-1024}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/mq-$STAMP
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshwork-mq-bench.XXXXXX")
STARTED_PIDS=()
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
cleanup() {
  for p in "${STARTED_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [[ ${BUILD:-1} != 0 ]]; then
  (cd "$ROOT" && CARGO_INCREMENTAL=0 cargo build --release -q -p meshwork)
fi
[[ -x $BIN ]] || { echo "no meshwork binary at $BIN" >&2; exit 1; }
[[ -x $NATS ]] || { echo "nats-server not found at $NATS (apt-get install nats-server)" >&2; exit 1; }
{
  echo "date: $(date -u)"; echo "machine: $(nproc) cores, $(uname -r)"
  echo "binary: $BIN $(stat -c '%y %s' "$BIN")"; echo "nats-server: $($NATS --version)"
  echo "settings: seconds=$SECONDS_PER_RUN publishers=$PUBLISHERS consume=$CONSUME concurrency=$CONCURRENCY rate=$RATE backlog=$BACKLOG size=$SIZE"
} >"$OUT/env.txt"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_node NAME ARGS... -> NODE_PID, NODE_HTTP
start_node() {
  local name=$1; shift
  "$BIN" server --http-addr 127.0.0.1:0 --etcd-addr 127.0.0.1:0 --data-dir "$WORK/$name" "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  NODE_PID=$!; STARTED_PIDS+=("$NODE_PID")
  local deadline=$((SECONDS + 60)); NODE_HTTP=
  while ((SECONDS < deadline)); do
    kill -0 "$NODE_PID" 2>/dev/null || { log "$name exited during start"; tail -20 "$WORK/$name.err" >&2; return 1; }
    NODE_HTTP=$(sed -n 's#^HTTP: http://##p' "$WORK/$name.out")
    if [[ -n $NODE_HTTP ]] && curl -fsS "http://$NODE_HTTP/readyz" >/dev/null 2>&1; then
      log "$name up: HTTP $NODE_HTTP (pid $NODE_PID)"; return 0
    fi
    sleep 0.1
  done
  log "$name not ready after 60 s"; return 1
}

start_nats() {
  NATS_PORT=$(free_port)
  "$NATS" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
  NATS_PID=$!; STARTED_PIDS+=("$NATS_PID")
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null; then log "nats-server up on $NATS_PORT (pid $NATS_PID)"; return 0; fi
    sleep 0.1
  done
  log "nats-server not ready"; return 1
}

# bench LABEL NODE_ARGS... : a fresh node and a fresh nats-server, one bench run
bench() {
  local label=$1; shift
  start_node "node-$label" "$@"
  local node_pid=$NODE_PID node_http=$NODE_HTTP
  start_nats
  log "run $label"
  "$BIN" bench mq --target "meshwork=$node_http,nats=nats://127.0.0.1:$NATS_PORT" \
    --pids "meshwork=$node_pid,nats=$NATS_PID" --seconds "$SECONDS_PER_RUN" \
    --publishers "$PUBLISHERS" --consume "$CONSUME" --concurrency "$CONCURRENCY" \
    --latency-rate "$RATE" --backlog "$BACKLOG" --size "$SIZE" --json >"$OUT/$label.json" 2>"$OUT/$label.err"
  kill -9 "$node_pid" "$NATS_PID" 2>/dev/null || true
  wait "$node_pid" "$NATS_PID" 2>/dev/null || true
  rm -rf "$WORK/node-$label" "$WORK/nats"
  python3 - "$OUT/$label.json" "$label" <<'PY' | tee -a "$OUT/table.md"
import json, sys
d = json.load(open(sys.argv[1])); label = sys.argv[2]
rows = {}
for r in d["results"]:
    rows.setdefault(r["run"], {})[r["target"]] = r
print(f"\n### {label}\n")
print("| run | meshwork msg/s | nats msg/s | ratio | meshwork p50 / p99 ms | nats p50 / p99 ms |")
print("|---|---:|---:|---:|---|---|")
for run, t in rows.items():
    m, n = t.get("meshwork", {}), t.get("nats", {})
    ratio = (m.get("msg_per_s", 0) / n["msg_per_s"]) if n.get("msg_per_s") else float("nan")
    lat = lambda r: f'{r.get("latency", {}).get("p50_ms", 0):.2f} / {r.get("latency", {}).get("p99_ms", 0):.2f}' if r.get("latency") else "-"
    print(f'| {run} | {m.get("msg_per_s", 0):,.0f} | {n.get("msg_per_s", 0):,.0f} | {ratio:.2f}x | {lat(m)} | {lat(n)} |')
for ph in d["phases"]:
    if ph["phase"].startswith("backlog"):
        p = ph["procs"]
        print(f'\n{ph["phase"]}: RSS meshwork {p["meshwork"]["rss_mib"]} MiB (peak {p["meshwork"]["hwm_mib"]}), nats {p["nats"]["rss_mib"]} MiB (peak {p["nats"]["hwm_mib"]})')
PY
}

bench fsync
bench nofsync --unsafe-no-fsync
log "results in $OUT"
