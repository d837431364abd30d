#!/usr/bin/env bash
# Registry, config-center and transaction benchmark, side by side: a Meshwork node on its embedded store
# vs. a Meshwork node coordinating on a 3-member etcd 3.4 cluster (Debian's /usr/bin/etcd),
# same machine, same run, same load generators (`meshwork bench txn`, `meshwork bench config`
# and `meshwork bench registry`, which talk to the node's HTTP API).
#
# Per side: 3-step sagas with a no-op participant at 1, 16 and 64 concurrent clients; config long-poll delivery (1,000 listeners on 10 entries, then on 1 entry),
# then the registry: 10,000 services x 10 ephemeral instances (TTL 30 s, heartbeats every
# 10 s for the rest of the run), registration throughput, 20 s of heartbeats alone, then
# change-to-delivery with 1,000 blocking-query watchers on one hot service and on 100
# services. Node and etcd CPU/RSS are sampled per phase by the generator (--pids) and the
# peak RSS (VmHWM) at the end by this script.
#
# Usage: bench/coord/run.sh            (issue scale; about 6-8 minutes on 2 cores)
#        QUICK=1 bench/coord/run.sh    (1,000 services, 200 watchers/listeners; ~2 minutes)
#   env: SERVICES=10000 INSTANCES=10 TTL=30 HOLD=20 WATCHERS=1000 SPREAD=100 CHANGES=50
#        LISTENERS=1000 ENTRIES=10 PUBLISHES=50 SIDES="embedded etcd"
#        BIN=target/release/meshwork ETCD=/usr/bin/etcd RUN_TIMEOUT=420 (seconds per bench)
#        BENCHES="config registry txn" (which generators run per side; default all three)
#        TXN_CONCURRENCY=1,16,64 TXN_SECONDS=10 (the txn bench: 3-step sagas, no-op participant)
#        BUILD=0 (use the existing binary instead of `cargo build --release -p meshwork`)
#        ETCD_FIRST=follower|leader (which member the etcd-side node talks to; default follower)
#
# Raw JSON and logs go to bench/results/coord-<timestamp>/; a side-by-side table is printed
# and written to table.md there. Only 127.0.0.1 is used; only the PIDs this script starts
# are killed (on exit, by trap); temp dirs are removed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
ETCD=${ETCD:-/usr/bin/etcd}
ETCDCTL=${ETCDCTL:-/usr/bin/etcdctl}
if [[ -n ${QUICK:-} ]]; then
  : "${SERVICES:=1000}" "${WATCHERS:=200}" "${LISTENERS:=200}" "${HOLD:=5}" "${CHANGES:=20}" "${PUBLISHES:=20}"
fi
SERVICES=${SERVICES:-10000}
INSTANCES=${INSTANCES:-10}
TTL=${TTL:-30}
HOLD=${HOLD:-20}
WATCHERS=${WATCHERS:-1000}
SPREAD=${SPREAD:-100}
CHANGES=${CHANGES:-50}
LISTENERS=${LISTENERS:-1000}
ENTRIES=${ENTRIES:-10}
PUBLISHES=${PUBLISHES:-50}
SIDES=${SIDES:-embedded etcd}
BENCHES=${BENCHES:-config registry txn}
TXN_CONCURRENCY=${TXN_CONCURRENCY:-1,16,64}
TXN_SECONDS=${TXN_SECONDS:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-420}
QUOTA=8589934592

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/coord-$STAMP
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshwork-coord-bench.XXXXXX")
STARTED_PIDS=()

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

cleanup() {
  local p
  for p in "${STARTED_PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null || true
  done
  sleep 1
  for p in "${STARTED_PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1,000 watchers + 64 registration + 64 heartbeat connections on each end, plus etcd.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < WATCHERS + 1024)); then
  log "warning: open-file limit $(ulimit -n) is below $((WATCHERS + 1024)); results may show connection errors"
fi

machine_info() {
  echo "## $1 $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"; grep -m1 'model name' /proc/cpuinfo; uptime
  grep -E 'MemTotal|MemAvailable' /proc/meminfo; echo "ulimit -n: $(ulimit -n)"
  echo "SERVICES=$SERVICES INSTANCES=$INSTANCES TTL=$TTL HOLD=$HOLD WATCHERS=$WATCHERS SPREAD=$SPREAD CHANGES=$CHANGES LISTENERS=$LISTENERS ENTRIES=$ENTRIES PUBLISHES=$PUBLISHES SIDES=$SIDES BENCHES=$BENCHES TXN_CONCURRENCY=$TXN_CONCURRENCY TXN_SECONDS=$TXN_SECONDS"
  echo "other busy processes:"; ps -eo pid,pcpu,etimes,comm --sort=-pcpu | head -6
  "$ETCD" --version | head -1; rustc --version
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD) ($(git -C "$ROOT" status --porcelain | wc -l) paths modified/untracked)"
}
machine_info start >>"$OUT/env.txt" 2>&1 || true

if [[ ${BUILD:-1} == 1 ]]; then
  log "building release binary"
  (cd "$ROOT" && cargo build --release -p meshwork)
fi
[[ -x $BIN ]] || { echo "no meshwork binary at $BIN" >&2; exit 1; }
echo "binary: $BIN $(stat -c '%y %s' "$BIN")" >>"$OUT/env.txt"
[[ -x $ETCD ]] || { echo "etcd not found at $ETCD (apt-get install etcd-server)" >&2; exit 1; }

# A free 127.0.0.1 port below the ephemeral range.
USED_PORTS=" "
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if ! ss -Htan "sport = :$p" | grep -q .; then
      USED_PORTS+="$p "
      echo "$p"
      return
    fi
  done
}

status_kb() { awk -v f="$2:" '$1==f {print $2}' "/proc/$1/status" 2>/dev/null || echo null; }

# start_node NAME ARGS... -> sets NODE_PID, NODE_HTTP
start_node() {
  local name=$1; shift
  "$BIN" server --http-addr 127.0.0.1:0 "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  NODE_PID=$!
  STARTED_PIDS+=("$NODE_PID")
  local deadline=$((SECONDS + 60))
  NODE_HTTP=
  while ((SECONDS < deadline)); do
    kill -0 "$NODE_PID" 2>/dev/null || { log "$name exited during start"; tail -20 "$WORK/$name.err" >&2; return 1; }
    NODE_HTTP=$(sed -n 's#^HTTP: http://##p' "$WORK/$name.out")
    if [[ -n $NODE_HTTP ]] && curl -fsS "http://$NODE_HTTP/readyz" >/dev/null 2>&1; then
      log "$name up: HTTP $NODE_HTTP (pid $NODE_PID)"
      return 0
    fi
    sleep 0.1
  done
  log "$name not ready after 60 s"; return 1
}

# start_etcd_cluster -> sets ETCD_PIDS (array), ETCD_ENDPOINTS (h:p,h:p,h:p)
start_etcd_cluster() {
  local i cluster="" eps=()
  local -a cport pport
  for i in 1 2 3; do
    cport[i]=$(free_port); pport[i]=$(free_port)
    cluster+="${cluster:+,}m$i=http://127.0.0.1:${pport[i]}"
    eps+=("127.0.0.1:${cport[i]}")
  done
  ETCD_PIDS=()
  for i in 1 2 3; do
    "$ETCD" --name "m$i" --data-dir "$WORK/etcd-m$i" \
      --listen-client-urls "http://127.0.0.1:${cport[i]}" --advertise-client-urls "http://127.0.0.1:${cport[i]}" \
      --listen-peer-urls "http://127.0.0.1:${pport[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${pport[i]}" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "coord-bench-$STAMP" \
      --quota-backend-bytes "$QUOTA" >"$WORK/etcd-m$i.out" 2>"$WORK/etcd-m$i.err" &
    ETCD_PIDS+=("$!")
    STARTED_PIDS+=("$!")
    echo "etcd$i (m$i): client 127.0.0.1:${cport[i]} pid $!" >>"$OUT/env.txt"
  done
  ETCD_ENDPOINTS=$(IFS=,; echo "${eps[*]}")
  local deadline=$((SECONDS + 60))
  while ((SECONDS < deadline)); do
    if ETCDCTL_API=3 "$ETCDCTL" --endpoints "$ETCD_ENDPOINTS" endpoint health >/dev/null 2>&1; then
      # The node talks to the first reachable endpoint: make that a follower (ETCD_FIRST=
      # follower, the case of 2 clients in 3) or the leader (ETCD_FIRST=leader), so runs
      # are comparable whichever member won the election.
      local leader
      leader=$(ETCDCTL_API=3 "$ETCDCTL" --endpoints "$ETCD_ENDPOINTS" endpoint status -w json 2>/dev/null |
        jq -r '.[] | select(.Status.header.member_id == .Status.leader) | .Endpoint' | head -1)
      if [[ -n $leader ]]; then
        local others
        others=$(tr ',' '\n' <<<"$ETCD_ENDPOINTS" | grep -vx "$leader" | paste -sd, -)
        if [[ ${ETCD_FIRST:-follower} == leader ]]; then
          ETCD_ENDPOINTS="$leader,$others"
        else
          ETCD_ENDPOINTS="$others,$leader"
        fi
      fi
      echo "etcd leader: ${leader:-unknown}; node endpoints (first is used): $ETCD_ENDPOINTS" >>"$OUT/env.txt"
      log "etcd cluster up: $ETCD_ENDPOINTS (leader ${leader:-unknown}; pids ${ETCD_PIDS[*]})"
      ETCDCTL_API=3 "$ETCDCTL" --endpoints "$ETCD_ENDPOINTS" endpoint status -w table >>"$OUT/etcd-status.txt" 2>&1 || true
      return 0
    fi
    sleep 0.2
  done
  log "etcd cluster not healthy after 60 s"; tail -20 "$WORK"/etcd-m*.err >&2; return 1
}

stop_pids() {
  local p
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}

# run_bench SIDE NAME ARGS... -> $OUT/SIDE-NAME.json (generator output) and .txt (stderr)
run_bench() {
  local side=$1 name=$2; shift 2
  log "$side: bench $name"
  if ! timeout "$RUN_TIMEOUT" "$BIN" bench "$@" --json >"$OUT/$side-$name.json" 2>"$OUT/$side-$name.stderr"; then
    log "$side $name failed or timed out (see $OUT/$side-$name.stderr)"
    echo '{}' >"$OUT/$side-$name.json"
  fi
  tr '\r' '\n' <"$OUT/$side-$name.stderr" | grep -v '^$' | tail -3 >&2 || true
}

# memory SIDE NAME:PID... -> $OUT/SIDE-memory.json
memory() {
  local side=$1 f=$OUT/$1-memory.json; shift
  local first=1 np
  {
    echo "{"
    for np in "$@"; do
      local n=${np%%:*} p=${np#*:}
      ((first)) || echo ","
      first=0
      printf '"%s": {"vmhwm_kb": %s, "vmrss_kb": %s, "rss_anon_kb": %s}' "$n" \
        "$(status_kb "$p" VmHWM)" "$(status_kb "$p" VmRSS)" "$(status_kb "$p" RssAnon)"
    done
    echo "}"
  } >"$f"
  log "$side memory: $(jq -c . "$f" 2>/dev/null || cat "$f")"
}

run_side() {
  local side=$1 pids
  if [[ $side == embedded ]]; then
    start_node node-embedded --etcd-addr 127.0.0.1:0 --data-dir "$WORK/node-embedded" --quota-backend-bytes "$QUOTA"
    pids="node=$NODE_PID"
  else
    start_etcd_cluster
    start_node node-etcd --store "etcd://$ETCD_ENDPOINTS" --data-dir "$WORK/node-etcd"
    pids="node=$NODE_PID,etcd1=${ETCD_PIDS[0]},etcd2=${ETCD_PIDS[1]},etcd3=${ETCD_PIDS[2]}"
  fi
  echo "$side: node pid $NODE_PID; $pids" >>"$OUT/env.txt"
  if [[ " $BENCHES " == *" txn "* ]]; then
    run_bench "$side" txn txn --http "$NODE_HTTP" --concurrency "$TXN_CONCURRENCY" --seconds "$TXN_SECONDS" \
      --steps 3 --pids "$pids"
  fi
  if [[ " $BENCHES " == *" config "* ]]; then
    run_bench "$side" config-spread config --http "$NODE_HTTP" --listeners "$LISTENERS" --entries "$ENTRIES" \
      --publishes "$PUBLISHES" --pids "$pids" --namespace bench --group SPREAD
    run_bench "$side" config-hot config --http "$NODE_HTTP" --listeners "$LISTENERS" --entries 1 \
      --publishes "$PUBLISHES" --pids "$pids" --namespace bench --group HOT
  fi
  if [[ " $BENCHES " == *" registry "* ]]; then
    run_bench "$side" registry registry --http "$NODE_HTTP" --services "$SERVICES" --instances "$INSTANCES" \
      --ttl "$TTL" --hold "$HOLD" --watchers "$WATCHERS" --spread "$SPREAD" --changes "$CHANGES" --pids "$pids"
  fi
  if [[ $side == embedded ]]; then
    memory "$side" "node:$NODE_PID"
    du -sk "$WORK/node-embedded" | awk '{print "{\"disk_kb\": " $1 "}"}' >"$OUT/$side-disk.json"
    stop_pids "$NODE_PID"
  else
    memory "$side" "node:$NODE_PID" "etcd1:${ETCD_PIDS[0]}" "etcd2:${ETCD_PIDS[1]}" "etcd3:${ETCD_PIDS[2]}"
    du -sk "$WORK/etcd-m1" | awk '{print "{\"disk_kb\": " $1 "}"}' >"$OUT/$side-disk.json"
    ETCDCTL_API=3 "$ETCDCTL" --endpoints "$ETCD_ENDPOINTS" endpoint status -w table >>"$OUT/etcd-status.txt" 2>&1 || true
    stop_pids "$NODE_PID" "${ETCD_PIDS[@]}"
  fi
  cp "$WORK"/*.err "$OUT"/ 2>/dev/null || true
}

T0=$SECONDS
for side in $SIDES; do
  run_side "$side"
done
machine_info end >>"$OUT/env.txt" 2>&1 || true
log "benchmarks done in $((SECONDS - T0)) s"

# --- report ------------------------------------------------------------------------------------
python3 - "$OUT" "$WATCHERS" "$SPREAD" "$LISTENERS" "$ENTRIES" <<'EOF'
import json, sys
out = sys.argv[1]
W, SP, L, E = (f"{int(x):,}" for x in sys.argv[2:6])
def load(p):
    try:
        with open(f"{out}/{p}") as f: return json.load(f)
    except Exception: return {}
S = ["embedded", "etcd"]
D = {s: {n: load(f"{s}-{n}.json") for n in ["config-spread", "config-hot", "registry", "txn"]} for s in S}
M = {s: load(f"{s}-memory.json") for s in S}
def g(d, *path):
    for p in path:
        if isinstance(d, list):
            d = next((x for x in d if x.get("scenario") == p), None) if isinstance(p, str) else (d[p] if p < len(d) else None)
        elif isinstance(d, dict): d = d.get(p)
        else: return None
        if d is None: return None
    return d
def fmt(v, unit):
    if v is None: return "n/a"
    if unit == "/s": return f"{v:,.0f}/s"
    if unit == " MiB": return f"{v:,.1f} MiB"
    if unit == "%": return f"{v:.0f}%"
    if unit == "": return f"{v:,.0f}"
    return f"{v:.3g}{unit}" if v < 100 else f"{v:,.0f}{unit}"
rows = []
def row(label, unit, better, fn):
    vals = [fn(s) for s in S]
    if all(v is None for v in vals):
        return  # a bench this run did not include (BENCHES)
    ratio = f"{vals[0]/vals[1]:.2f}x" if (vals[0] is not None and vals[1]) else "n/a"
    rows.append((label, fmt(vals[0], unit), fmt(vals[1], unit), ratio, better))
def reg(s, *p): return g(D[s]["registry"], *p)
def kb(s, proc, f):
    v = g(M[s], proc, f)
    return v / 1024 if isinstance(v, (int, float)) else None
row("registrations/s (ephemeral, 64 conns)", "/s", "higher", lambda s: reg(s, "register", "per_sec"))
row("registration call p99", " ms", "lower", lambda s: reg(s, "register", "latency", "p99_ms"))
row("registration errors", "", "lower", lambda s: reg(s, "register", "errors"))
row("heartbeats/s sustained (target N/10 s)", "/s", "higher", lambda s: reg(s, "heartbeat", "hold_per_sec"))
row("heartbeat call p99", " ms", "lower", lambda s: reg(s, "heartbeat", "latency", "p99_ms"))
row("heartbeat lag behind schedule while registering, max", " ms", "lower", lambda s: reg(s, "heartbeat", "lag_registering", "max_ms"))
row("heartbeat lag behind schedule after registration, p99", " ms", "lower", lambda s: reg(s, "heartbeat", "lag_steady", "p99_ms"))
row("heartbeat lag behind schedule after registration, max", " ms", "lower", lambda s: reg(s, "heartbeat", "lag_steady", "max_ms"))
row("leases expired (re-registered)", "", "lower", lambda s: reg(s, "heartbeat", "expired"))
row("heartbeat errors", "", "lower", lambda s: reg(s, "heartbeat", "errors"))
for sc, lab in [("hot", "1 hot service"), ("spread", f"{SP} services")]:
    for q in ["p50_ms", "p99_ms", "max_ms"]:
        row(f"change-to-watcher {q[:-3]}, {W} watchers on {lab}", " ms", "lower", lambda s, sc=sc, q=q: reg(s, "watch", sc, "latency", q))
    row(f"  deliveries ({lab})", "", "higher", lambda s, sc=sc: reg(s, "watch", sc, "deliveries"))
    row(f"  missed ({lab})", "", "lower", lambda s, sc=sc: reg(s, "watch", sc, "missed"))
    row(f"  change call p50 ({lab})", " ms", "lower", lambda s, sc=sc: reg(s, "watch", sc, "change_call", "p50_ms"))
for n, lab in [("config-spread", f"{L} listeners on {E} entries"), ("config-hot", f"{L} listeners on 1 entry")]:
    for q in ["p50_ms", "p99_ms"]:
        row(f"config publish-to-listener {q[:-3]}, {lab}", " ms", "lower", lambda s, n=n, q=q: g(D[s][n], "latency", q))
    row(f"  missed ({lab})", "", "lower", lambda s, n=n: g(D[s][n], "missed"))
    row(f"  publish call p50 ({lab})", " ms", "lower", lambda s, n=n: g(D[s][n], "publish_call", "p50_ms"))
for r in (D["embedded"]["txn"].get("runs") or D["etcd"]["txn"].get("runs") or []):
    c = r.get("concurrency")
    def txn_run(s, c=c):
        return next((x for x in (D[s]["txn"].get("runs") or []) if x.get("concurrency") == c), {})
    row(f"3-step sagas/s, concurrency {c}", "/s", "higher", lambda s, f=txn_run: g(f(s), "per_sec"))
    row(f"  coordinator time per step p50 (c={c})", " ms", "lower", lambda s, f=txn_run: g(f(s), "per_step_p50_ms"))
    row(f"  coordinator time per step p99 (c={c})", " ms", "lower", lambda s, f=txn_run: g(f(s), "per_step_p99_ms"))
    row(f"  saga errors (c={c})", "", "lower", lambda s, f=txn_run: g(f(s), "errors"))
def phase(d, name): return next((p for p in (d.get("phases") or []) if p.get("phase") == name), {})
row("node RSS after registration", " MiB", "lower", lambda s: g(phase(D[s]["registry"], "register"), "procs", "node", "rss_mib"))
row("node peak RSS (VmHWM), end of run", " MiB", "lower", lambda s: kb(s, "node", "vmhwm_kb"))
row("etcd members' peak RSS, sum of 3", " MiB", "lower", lambda s: (sum(kb(s, f"etcd{i}", "vmhwm_kb") or 0 for i in (1, 2, 3)) or None) if s == "etcd" else None)
row("node + store peak RSS (all processes)", " MiB", "lower", lambda s: sum(kb(s, p, "vmhwm_kb") or 0 for p in ["node", "etcd1", "etcd2", "etcd3"]) or None)
print(f"\nResults: {out}\n")
lines = ["| metric | embedded | etcd x3 | embedded/etcd | better |", "|---|---:|---:|---:|---|"]
lines += ["| " + " | ".join(r) + " |" for r in rows]
# CPU per phase
lines += ["", "CPU per phase (% of one core; machine = every busy CPU, 200% = both cores):", "",
          "| side | phase | wall s | node | etcd1 | etcd2 | etcd3 | generator | machine |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
for s in S:
    for n in ["txn", "config-spread", "config-hot", "registry"]:
        for v in (D[s][n].get("phases") or []):
            ph = v.get("phase")
            cells = [fmt(g(v, "procs", p, "cpu_pct"), "%") if g(v, "procs", p) else "" for p in ["node", "etcd1", "etcd2", "etcd3", "generator", "machine"]]
            lines.append(f"| {s} | {n}:{ph} | {v.get('wall_s', 0):.1f} | " + " | ".join(cells) + " |")
text = "\n".join(lines)
print(text)
with open(f"{out}/table.md", "w") as f: f.write(text + "\n")
EOF
