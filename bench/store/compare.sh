#!/usr/bin/env bash
# Side-by-side benchmark: Meshwork's etcd-v3 store vs. a real single-node etcd (Debian's
# etcd-server), both with data on the same disk and fsync on, driven by the same load generator
# (`meshwork bench kv`) on the same machine in the same run.
#
# Usage: bench/store/compare.sh            (all phases)
#   env: REPS=3            repetitions of each cheap workload (medians are reported)
#        KEYS_1M=1000000   keys for the RSS / restart phase
#        PHASES="workloads watch million"   which phases to run
#        ETCD=/usr/bin/etcd  BIN=target/release/meshwork
#        SIDES="meshwork etcd"   MESHWORK_CONFIG=file.toml (read by the meshwork server)
#        MESHWORK_LD_PRELOAD=/path/shim.so   run the meshwork server under LD_PRELOAD (see
#                                            nodelay-shim.c); recorded in env.txt
#
# Prints a markdown table; raw JSON of every run goes to bench/results/compare-<timestamp>/.
# Only 127.0.0.1 ports are used; only the PIDs this script starts are ever killed; every load
# run is bounded by `timeout`; temp dirs are removed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/meshwork}
ETCD=${ETCD:-/usr/bin/etcd}
REPS=${REPS:-3}
KEYS_1M=${KEYS_1M:-1000000}
PHASES=${PHASES:-"workloads watch million"}
QUOTA=8589934592
PUT1_TOTAL=${PUT1_TOTAL:-5000}        # put, 1 client / 1 conn
PUTN_TOTAL=${PUTN_TOTAL:-60000}       # put, 1000 clients / 100 conns
GET1_TOTAL=${GET1_TOTAL:-2000}       # range, 1 client
GETN_TOTAL=${GETN_TOTAL:-100000}      # range, 1000 clients
GET_KEYS=${GET_KEYS:-10000}           # keys prefilled for the range workloads
WATCHERS=${WATCHERS:-10000}
WATCH_PUTS=${WATCH_PUTS:-100}
WATCH_RATE=${WATCH_RATE:-10}
WATCH_REPS=${WATCH_REPS:-$REPS}
RESTARTS=${RESTARTS:-3}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}       # seconds, per load-generator run
LOAD_TIMEOUT=${LOAD_TIMEOUT:-1800}    # seconds, for the 1M-key load

SIDES_REQ=${SIDES:-meshwork etcd}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/compare-$STAMP
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshwork-compare.XXXXXX")
declare -A PID=() EP=() HTTP=()
machine_info() {
  echo "## $1 $(date -u +%FT%TZ)"; echo "nproc: $(nproc)"; uptime
  df -h "$WORK" | tail -1; echo "MESHWORK_LD_PRELOAD=${MESHWORK_LD_PRELOAD:-} SIDES=${SIDES_REQ} PHASES=$PHASES"
  [[ -n ${MESHWORK_CONFIG:-} ]] && { echo "MESHWORK_CONFIG=$MESHWORK_CONFIG:"; cat "$MESHWORK_CONFIG"; }
  echo "other heavy processes:"; ps -eo pid,pcpu,etimes,comm --sort=-pcpu | head -6
  "$ETCD" --version | head -1; git -C "$ROOT" rev-parse --short HEAD
}
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
machine_info start >>"$OUT/env.txt" 2>&1 || true

if [[ ! -x $BIN ]]; then
  log "building release binary"
  (cd "$ROOT" && cargo build --release -p meshwork)
fi
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

now() { date +%s.%N; }

# --- server lifecycle -------------------------------------------------------------------------

# start_server SIDE DATADIR  (sets PID[SIDE], EP[SIDE]; reuses EP ports on restart)
start_server() {
  local side=$1 dir=$2
  mkdir -p "$dir"
  if [[ -z ${EP[$side]:-} ]]; then
    EP[$side]=127.0.0.1:$(free_port)
    HTTP[$side]=127.0.0.1:$(free_port)
  fi
  if [[ $side == meshwork ]]; then
    LD_PRELOAD=${MESHWORK_LD_PRELOAD:-} "$BIN" server --data-dir "$dir" --etcd-addr "${EP[$side]}" --http-addr "${HTTP[$side]}" \
      --quota-backend-bytes "$QUOTA" >>"$WORK/$side.out" 2>>"$WORK/$side.err" &
  else
    # HTTP[etcd] is used as the peer URL.
    "$ETCD" --name compare --data-dir "$dir" \
      --listen-client-urls "http://${EP[$side]}" --advertise-client-urls "http://${EP[$side]}" \
      --listen-peer-urls "http://${HTTP[$side]}" --initial-advertise-peer-urls "http://${HTTP[$side]}" \
      --initial-cluster "compare=http://${HTTP[$side]}" --initial-cluster-state new \
      --quota-backend-bytes "$QUOTA" >>"$WORK/$side.out" 2>>"$WORK/$side.err" &
  fi
  PID[$side]=$!
  STARTED_PIDS+=("${PID[$side]}")
}

# Wait until a linearizable range of KEY returns it (or, with KEY empty, any successful range).
# Prints seconds since T0.
wait_range() {
  local side=$1 t0=$2 key=${3:-} deadline=$((SECONDS + 600)) out
  while ((SECONDS < deadline)); do
    kill -0 "${PID[$side]}" 2>/dev/null || { log "$side exited during start"; tail -20 "$WORK/$side.err" >&2; return 1; }
    if out=$("$BIN" kv --endpoints "${EP[$side]}" --json get "${key:-compare-probe}" 2>/dev/null); then
      if [[ -z $key ]] || [[ $out == *'"count":1'* ]]; then
        awk -v a="$(now)" -v b="$t0" 'BEGIN{printf "%.3f\n", a-b}'
        return 0
      fi
    fi
    sleep 0.02
  done
  log "$side not ready after 600s"; return 1
}

stop_server() {
  local side=$1 p=${PID[$1]} i
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 1 600); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$p" 2>/dev/null; then
    log "$side did not stop in 60s; SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
  fi
  wait "$p" 2>/dev/null || true
}

status_kb() { awk -v f="$2:" '$1==f {print $2}' "/proc/$1/status"; }
cpu_secs() { # utime+stime of PID in seconds
  awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15)/hz}' "/proc/$1/stat"
}
metrics() { # SIDE FILE
  if [[ ${1} == meshwork ]]; then
    curl -fsS "http://${HTTP[$1]}/metrics" >"$2" || true
  else
    curl -fsS "http://${EP[$1]}/metrics" >"$2" || true
  fi
}

# bench SIDE NAME ARGS...  -> writes $OUT/SIDE-NAME.json, adds server CPU seconds
bench() {
  local side=$1 name=$2; shift 2
  local c0 c1 f=$OUT/$side-$name.json
  metrics "$side" "$OUT/$side-$name.metrics.before"
  c0=$(cpu_secs "${PID[$side]}")
  if ! timeout "$RUN_TIMEOUT" "$BIN" bench kv --endpoints "${EP[$side]}" --json "$@" \
      >"$f.tmp" 2>"$OUT/$side-$name.stderr"; then
    log "$side $name failed or timed out"; echo '{}' >"$f.tmp"
  fi
  c1=$(cpu_secs "${PID[$side]}")
  metrics "$side" "$OUT/$side-$name.metrics.after"
  jq -c --argjson cpu "$(awk -v a="$c1" -v b="$c0" 'BEGIN{printf "%.3f", a-b}')" \
    '. + {server_cpu_s: $cpu, server_cpu_us_per_op: (if (.requests // 0) > 0 then $cpu * 1e6 / .requests else null end)}' \
    "$f.tmp" >"$f" \
    || cp "$f.tmp" "$f"
  rm -f "$f.tmp"
  log "$side $name: $(jq -c '{throughput, p50_ms, p99_ms, errors, server_cpu_s}' "$f" 2>/dev/null)"
}

read -r -a SIDES <<<"$SIDES_REQ"
# Alternate which side goes first on each repetition to spread any drift in background load.
order() {
  if ((${#SIDES[@]} < 2)); then echo "${SIDES[@]}"
  elif (($1 % 2)); then echo etcd meshwork; else echo meshwork etcd; fi
}

# --- phase 1: put / range workloads -------------------------------------------------------------
if [[ " $PHASES " == *" workloads "* || " $PHASES " == *" watch "* ]]; then
  for s in "${SIDES[@]}"; do
    start_server "$s" "$WORK/$s-a"
    wait_range "$s" "$(now)" >/dev/null
    log "$s up on ${EP[$s]} (pid ${PID[$s]})"
  done
fi

if [[ " $PHASES " == *" workloads "* ]]; then
  for s in "${SIDES[@]}"; do
    bench "$s" prefill --op put --sequential --total "$GET_KEYS" --key-space "$GET_KEYS" --clients 100 --conns 10
  done
  for r in $(seq 1 "$REPS"); do
    for s in $(order "$r"); do
      bench "$s" put-c1-r$r  --op put --clients 1 --conns 1 --total "$PUT1_TOTAL" --key-size 8 --value-size 256 --key-space 100000
      bench "$s" put-c1000-r$r --op put --clients 1000 --conns 100 --total "$PUTN_TOTAL" --key-size 8 --value-size 256 --key-space 100000
      bench "$s" get-c1-r$r  --op get --clients 1 --conns 1 --total "$GET1_TOTAL" --key-space "$GET_KEYS"
      bench "$s" get-c1000-r$r --op get --clients 1000 --conns 100 --total "$GETN_TOTAL" --key-space "$GET_KEYS"
      bench "$s" gets-c1-r$r  --op get-serializable --clients 1 --conns 1 --total "$GET1_TOTAL" --key-space "$GET_KEYS"
      bench "$s" gets-c1000-r$r --op get-serializable --clients 1000 --conns 100 --total "$GETN_TOTAL" --key-space "$GET_KEYS"
    done
  done
fi

if [[ " $PHASES " == *" watch "* ]]; then
  for r in $(seq 1 "$WATCH_REPS"); do
    for s in $(order "$r"); do
      bench "$s" watch-r$r --op watch --watchers "$WATCHERS" --conns 100 --total "$WATCH_PUTS" --rate "$WATCH_RATE" --value-size 256
    done
  done
fi

for s in "${SIDES[@]}"; do
  if [[ -n ${PID[$s]:-} ]] && kill -0 "${PID[$s]}" 2>/dev/null; then stop_server "$s"; fi
done

# --- phase 2: 1M keys: peak RSS, on-disk size, restart time --------------------------------------
if [[ " $PHASES " == *" million "* ]]; then
  for s in "${SIDES[@]}"; do
    dir=$WORK/$s-m
    start_server "$s" "$dir"
    wait_range "$s" "$(now)" >/dev/null
    log "$s: loading $KEYS_1M keys"
    RUN_TIMEOUT=$LOAD_TIMEOUT bench "$s" load1m --op put --sequential --total "$KEYS_1M" --key-space "$KEYS_1M" \
      --clients 1000 --conns 100 --key-size 8 --value-size 256
    p=${PID[$s]}
    jq -n --arg side "$s" \
      --argjson hwm "$(status_kb "$p" VmHWM)" --argjson rss "$(status_kb "$p" VmRSS)" \
      --argjson anon "$(status_kb "$p" RssAnon)" --argjson file "$(status_kb "$p" RssFile)" \
      --argjson disk "$(du -sk "$dir" | cut -f1)" \
      '{side:$side, vmhwm_kb:$hwm, vmrss_kb:$rss, rss_anon_kb:$anon, rss_file_kb:$file, disk_kb:$disk}' \
      >"$OUT/$s-rss1m.json"
    log "$s after load: $(cat "$OUT/$s-rss1m.json")"
    for i in $(seq 1 "$RESTARTS"); do
      stop_server "$s"
      t0=$(now)
      start_server "$s" "$dir"
      secs=$(wait_range "$s" "$t0" "$(printf '%08d' $((KEYS_1M - 1)))")
      p=${PID[$s]}
      jq -n --arg side "$s" --argjson secs "$secs" \
        --argjson hwm "$(status_kb "$p" VmHWM)" --argjson rss "$(status_kb "$p" VmRSS)" \
        '{side:$side, restart_s:$secs, vmhwm_kb:$hwm, vmrss_kb:$rss}' >"$OUT/$s-restart-r$i.json"
      log "$s restart $i: $(cat "$OUT/$s-restart-r$i.json")"
    done
    stop_server "$s"
  done
fi

cp "$WORK"/*.err "$OUT"/ 2>/dev/null || true
machine_info end >>"$OUT/env.txt" 2>&1 || true

# --- report ---------------------------------------------------------------------------------------
python3 - "$OUT" <<'EOF'
import json, glob, os, statistics, sys
out = sys.argv[1]
def load(p):
    try:
        with open(p) as f: return json.load(f)
    except Exception: return {}
def med(side, name, field):
    vals = []
    for p in sorted(glob.glob(f"{out}/{side}-{name}-r*.json")) or [f"{out}/{side}-{name}.json"]:
        v = load(p).get(field)
        if v is not None: vals.append(v)
    return (statistics.median(vals), len(vals)) if vals else (None, 0)
def fmt(v, unit=""):
    if v is None: return "n/a"
    if abs(v) >= 1000: return f"{v:,.0f}{unit}"
    if abs(v) >= 10: return f"{v:.1f}{unit}"
    return f"{v:.3g}{unit}"
rows = []
def row(label, name, field, unit="", higher_better=True, scale=1.0):
    m, n = med("meshwork", name, field); e, _ = med("etcd", name, field)
    if m is None and e is None: return
    m = m * scale if m is not None else None; e = e * scale if e is not None else None
    ratio = (m / e) if (m is not None and e) else None
    rows.append((label, fmt(m, unit), fmt(e, unit), f"{ratio:.2f}x" if ratio is not None else "n/a",
                 "higher" if higher_better else "lower", n))
for label, name in [("put 1 client/1 conn", "put-c1"), ("put 1000 clients/100 conns", "put-c1000"),
                    ("range linearizable 1/1", "get-c1"), ("range linearizable 1000/100", "get-c1000"),
                    ("range serializable 1/1", "gets-c1"), ("range serializable 1000/100", "gets-c1000")]:
    row(f"{label}: throughput", name, "throughput", "/s")
    row(f"{label}: p50", name, "p50_ms", " ms", False)
    row(f"{label}: p99", name, "p99_ms", " ms", False)
    row(f"{label}: server CPU per op", name, "server_cpu_us_per_op", " us", False)
row("watch 10k watchers: delivery p50", "watch", "p50_ms", " ms", False)
row("watch 10k watchers: delivery p99", "watch", "p99_ms", " ms", False)
row("watch 10k watchers: events lost", "watch", "errors", "", False)
row("load 1M keys (1000/100): throughput", "load1m", "throughput", "/s")
row("load 1M keys: p99", "load1m", "p99_ms", " ms", False)
for label, field, scale in [("peak RSS (VmHWM) after 1M keys", "vmhwm_kb", 1/1024),
                            ("RSS (VmRSS) after 1M keys", "vmrss_kb", 1/1024),
                            ("  of which anonymous", "rss_anon_kb", 1/1024),
                            ("  of which file-backed (mmap)", "rss_file_kb", 1/1024),
                            ("on-disk size after 1M keys", "disk_kb", 1/1024)]:
    row(label, "rss1m", field, " MiB", False, scale)
row("restart time with 1M keys (start -> range ok)", "restart", "restart_s", " s", False)
row("RSS after restart with 1M keys", "restart", "vmrss_kb", " MiB", False, 1/1024)
print(f"\nResults: {out}\n")
print("| metric | meshwork | etcd 3.4 | meshwork/etcd | better | n |")
print("|---|---:|---:|---:|---|---:|")
for r in rows: print("| " + " | ".join(str(x) for x in r) + " |")
with open(f"{out}/table.md", "w") as f:
    f.write("| metric | meshwork | etcd 3.4 | meshwork/etcd | better | n |\n|---|---:|---:|---:|---|---:|\n")
    for r in rows: f.write("| " + " | ".join(str(x) for x in r) + " |\n")
EOF
