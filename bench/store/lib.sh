# Shared by the etcd-client bench scripts: sourced, not run.
HZ=$(getconf CLK_TCK)
# A scratch directory, and the PIDs started here, all cleaned up on exit.
TMP=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
# utime+stime of a process, in clock ticks.
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# Waits (at most 10 s) until 127.0.0.1:PORT accepts connections.
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# The median of the numbers on standard input, one per line.
median() { sort -n | awk '{v[NR]=$1} END{if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
# Builds the etcd-client load generator (needs a system protoc); sets LOAD.
build_load() {
  export CARGO_TARGET_DIR=${LOAD_TARGET:-/tmp/etcd-client-load-target}
  (cd "$ROOT/bench/store/etcd-client-load" && cargo build --release -q)
  LOAD=$CARGO_TARGET_DIR/release/etcd-client-load
}
