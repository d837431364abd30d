#!/usr/bin/env bash
# Checks an image built by build.sh without a container runtime: unpacks its
# layers, checks its configuration (user, volume, entrypoint), and runs the
# binary it holds as the image would (`up --data-dir DATA`, with a user other
# than root when this script runs as root), then checks /healthz and /readyz
# answer, and that SIGTERM stops it cleanly (exit 0).
#
#   deploy/image/check.sh target/image/meshwork-<version>.oci.tar
set -euo pipefail
archive=${1:?usage: check.sh IMAGE.oci.tar}
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
pid=""

tar -xf "$archive" -C "$work"
python3 - "$work" <<'PY'
import json, os, sys, tarfile
work = sys.argv[1]
def blob(d): return os.path.join(work, "blobs", *d.split(":"))
index = json.load(open(os.path.join(work, "index.json")))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
config = json.load(open(blob(manifest["config"]["digest"])))["config"]
assert config["User"] == "65532:65532", config
assert "/data" in config["Volumes"], config
assert config["Entrypoint"] == ["/usr/local/bin/meshwork"], config
assert config["Cmd"] == ["up", "--data-dir", "/data"], config
root = os.path.join(work, "rootfs")
os.makedirs(root)
for layer in manifest["layers"]:
    with tarfile.open(blob(layer["digest"])) as t:
        t.extractall(root, filter="tar")
members = sorted(os.listdir(root))
assert members == ["data", "etc", "tmp", "usr"], members
print("image config ok:", config["User"], config["Entrypoint"], config["Cmd"])
PY
bin="$work/rootfs/usr/local/bin/meshwork"
if ! ldd "$bin" 2>&1 | grep -qE 'not a dynamic executable|statically linked'; then
  echo "the image's binary is not static" >&2; exit 1
fi
"$bin" version

data="$work/data"
mkdir -p "$data"
run=("$bin" up --data-dir "$data" --etcd-addr 127.0.0.1:0 --http-addr 127.0.0.1:0
     --gateway-addr 127.0.0.1:0 --cache-addr 127.0.0.1:0 --otlp-grpc-addr 127.0.0.1:0
     --otlp-http-addr 127.0.0.1:0)
if [ "$(id -u)" = "0" ] && command -v setpriv >/dev/null; then
  chown -R 65532:65532 "$data"; chmod 755 "$work" "$work/rootfs" "$work/rootfs/usr" "$work/rootfs/usr/local" "$work/rootfs/usr/local/bin"
  run=(setpriv --reuid 65532 --regid 65532 --clear-groups "${run[@]}")
fi
"${run[@]}" >"$work/out.log" 2>"$work/err.log" &
pid=$!
http=""
for _ in $(seq 1 300); do
  http=$(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$work/out.log" | head -1 || true)
  [ -n "$http" ] && break
  sleep 0.1
done
[ -n "$http" ] || { echo "no HTTP address printed"; cat "$work/out.log" "$work/err.log"; exit 1; }
for path in /healthz /readyz; do
  ok=""
  for _ in $(seq 1 100); do
    if curl -fsS "$http$path" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "$path did not answer 200"; cat "$work/err.log"; exit 1; }
  echo "$path ok"
done
kill -TERM "$pid"
if wait "$pid"; then echo "SIGTERM: clean exit"; else echo "SIGTERM: exit $?"; cat "$work/err.log"; exit 1; fi
pid=""
echo "image check passed"
