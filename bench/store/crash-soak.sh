#!/usr/bin/env bash
# Crash soak for Meshwork's store: N times, start the server on one data dir, put load on it,
# SIGKILL it at a random moment, restart it, and check that every write that was acknowledged
# before the kill is there with the acknowledged value.
#
# Usage: bench/store/crash-soak.sh [ITERATIONS]      (default 20)
#   env: WRITERS=4        acknowledged-write loops (`meshwork kv put`, one process per put)
#        LOAD_CLIENTS=50  extra background load from `meshwork bench kv --op put` (0 = none)
#        MIN_MS=500 MAX_MS=4000   the kill lands uniformly in [MIN_MS, MAX_MS] after start
#        BIN=target/release/meshwork  KEEP=1 (keep the data dir)
# Exit status 0 only if no acknowledged write was lost in any iteration.
# Only 127.0.0.1 is used; only the PIDs started here are killed; bounded by ITERATIONS.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
ITER=${1:-${ITER:-20}}
WRITERS=${WRITERS:-4}
LOAD_CLIENTS=${LOAD_CLIENTS:-50}
MIN_MS=${MIN_MS:-500}
MAX_MS=${MAX_MS:-4000}

if [[ ! -x $BIN ]]; then (cd "$ROOT" && cargo build --release -p meshwork); fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/crash-soak-$STAMP
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshwork-soak.XXXXXX")
DATA=$WORK/data
ACKED=$OUT/acked.txt
: >"$ACKED"
SERVER=""
BG=()

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/soak.log" >&2; }

cleanup() {
  local p
  for p in "${BG[@]}" $SERVER; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n ${KEEP:-} ]] && log "data kept in $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    ss -Htan "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
}
EP=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)
while [[ $HTTP == "$EP" ]]; do HTTP=127.0.0.1:$(free_port); done

start_server() {
  "$BIN" server --data-dir "$DATA" --etcd-addr "$EP" --http-addr "$HTTP" \
    >>"$OUT/server.out" 2>>"$OUT/server.err" &
  SERVER=$!
  local deadline=$((SECONDS + 120))
  until curl -fsS "http://$HTTP/readyz" >/dev/null 2>&1; do
    kill -0 "$SERVER" 2>/dev/null || { log "server exited during start"; tail -20 "$OUT/server.err" >&2; return 1; }
    ((SECONDS < deadline)) || { log "server not ready after 120s"; return 1; }
    sleep 0.05
  done
}

# writer ITER W: put soak/ITER/W/N = vITER.W.N until a put fails; record each acknowledged one.
writer() {
  local it=$1 w=$2 n=0 k v
  while :; do
    k=$(printf 'soak/%04d/%d/%06d' "$it" "$w" "$n")
    v="v$it.$w.$n"
    if "$BIN" kv --endpoints "$EP" put "$k" "$v" >/dev/null 2>&1; then
      echo "$k $v" >>"$ACKED.$w"
    else
      return 0
    fi
    n=$((n + 1))
  done
}

failures=0
for it in $(seq 1 "$ITER"); do
  start_server
  BG=()
  if ((LOAD_CLIENTS > 0)); then
    "$BIN" bench kv --endpoints "$EP" --op put --clients "$LOAD_CLIENTS" --conns 5 \
      --total 1000000000 --key-space 100000 >/dev/null 2>&1 &
    BG+=($!)
  fi
  for w in $(seq 1 "$WRITERS"); do
    : >"$ACKED.$w"
    writer "$it" "$w" &
    BG+=($!)
  done
  ms=$((MIN_MS + (RANDOM * 32768 + RANDOM) % (MAX_MS - MIN_MS + 1)))
  sleep "$(awk -v m="$ms" 'BEGIN{printf "%.3f", m/1000}')"
  kill -KILL "$SERVER"
  wait "$SERVER" 2>/dev/null || true
  # Writers stop on their first failed put; the load generator is stopped by PID.
  if ((LOAD_CLIENTS > 0)); then kill -KILL "${BG[0]}" 2>/dev/null || true; fi
  for p in "${BG[@]}"; do wait "$p" 2>/dev/null || true; done
  BG=()
  # Only now are the per-writer ack files final (a put acked after SIGKILL cannot exist).
  this=0
  for w in $(seq 1 "$WRITERS"); do
    this=$((this + $(wc -l <"$ACKED.$w")))
    cat "$ACKED.$w" >>"$ACKED"
    rm -f "$ACKED.$w"
  done

  t0=$(date +%s.%N)
  start_server
  t1=$(date +%s.%N)
  "$BIN" kv --endpoints "$EP" --json get --prefix soak/ >"$WORK/got.json"
  lost=$(python3 - "$ACKED" "$WORK/got.json" <<'EOF'
import json, sys
acked = {}
for line in open(sys.argv[1]):
    k, v = line.rstrip("\n").split(" ", 1)
    acked[k] = v
got = {kv["key"]: kv["value"] for kv in json.load(open(sys.argv[2]))["kvs"]}
bad = [k for k, v in acked.items() if got.get(k) != v]
for k in bad[:10]:
    print(f"LOST {k}: acked {acked[k]!r}, found {got.get(k)!r}", file=sys.stderr)
print(len(bad))
EOF
)
  total=$(wc -l <"$ACKED")
  log "iter $it: killed after ${ms}ms; acked this round $this, total $total; lost $lost; restart $(awk -v a="$t1" -v b="$t0" 'BEGIN{printf "%.2f", a-b}')s"
  if [[ $lost != 0 ]]; then failures=$((failures + 1)); fi
  kill -TERM "$SERVER"
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
done

log "done: $ITER iterations, $(wc -l <"$ACKED") acknowledged writes checked each time, iterations with losses: $failures"
((failures == 0))
