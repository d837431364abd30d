#!/usr/bin/env bash
# Builds Meshwork's container image without pulling anything: a statically
# linked binary (glibc, crt-static) in an image from `scratch`, made with
# Debian's buildah (vfs storage: no daemon, no privileges needed).
#
#   deploy/image/build.sh                 # profile dist (LTO, stripped): the shipped image
#   PROFILE=release deploy/image/build.sh # faster to build (CI)
#
# Out: target/image/meshwork-<version>.oci.tar (an OCI archive: `podman load -i`,
# `skopeo copy oci-archive:... docker://REGISTRY/meshwork:<version>`), and the
# image localhost/meshwork:<version> in buildah's storage.
#
# The image: /usr/local/bin/meshwork, user 65532 (meshwork, not root), working
# directory and volume /data (the node's data directory), ports 2479 (etcd
# gRPC), 7070 (HTTP: API, console, /healthz, /readyz, /metrics), 8080
# (gateway), 6479 (cache), 4317/4318 (OTLP). Entrypoint `meshwork`, default
# command `up --data-dir /data`; the binary is PID 1 and stops cleanly on
# SIGTERM (deregisters, drains, flushes the store).
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${PROFILE:-dist}
triple=x86_64-unknown-linux-gnu
out=target/image
storage=(--storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}")

command -v buildah >/dev/null || { echo "buildah is missing: apt-get install buildah" >&2; exit 1; }

echo "== static binary (profile $profile, $triple, crt-static)"
# An explicit --target keeps the flags off build scripts and proc macros.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --locked --profile "$profile" --target "$triple" -p meshwork
bin="target/$triple/$profile/meshwork"
if ! ldd "$bin" 2>&1 | grep -qE 'not a dynamic executable|statically linked'; then
  echo "$bin is dynamically linked:" >&2; ldd "$bin" >&2; exit 1
fi
version=$("$bin" version | awk '{print $2}')

echo "== root filesystem"
rootfs="$out/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/data" "$rootfs/tmp"
cp "$bin" "$rootfs/usr/local/bin/meshwork"
strip --strip-all "$rootfs/usr/local/bin/meshwork" 2>/dev/null || true
printf 'root:x:0:0:root:/:/sbin/nologin\nmeshwork:x:65532:65532:meshwork:/data:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nmeshwork:x:65532:\n' > "$rootfs/etc/group"
# Name resolution from files, then DNS (static glibc has both built in).
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
chmod 1777 "$rootfs/tmp"

echo "== image localhost/meshwork:$version"
ctr=$(buildah "${storage[@]}" from scratch)
trap 'buildah "${storage[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah "${storage[@]}" copy "$ctr" "$rootfs/usr" /usr
buildah "${storage[@]}" copy "$ctr" "$rootfs/etc" /etc
buildah "${storage[@]}" copy "$ctr" "$rootfs/tmp" /tmp
buildah "${storage[@]}" copy --chown 65532:65532 "$ctr" "$rootfs/data" /data
rev=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
buildah "${storage[@]}" config \
  --user 65532:65532 \
  --workingdir /data \
  --volume /data \
  --entrypoint '["/usr/local/bin/meshwork"]' \
  --cmd '["up","--data-dir","/data"]' \
  --stop-signal SIGTERM \
  --env MESHWORK_DATA_DIR=/data \
  --port 2479 --port 7070 --port 8080 --port 6479 --port 4317 --port 4318 \
  --label org.opencontainers.image.title=meshwork \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$rev" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label org.opencontainers.image.source=https://github.com/meshwork-rs/meshwork \
  "$ctr"
buildah "${storage[@]}" commit --rm "$ctr" "localhost/meshwork:$version" >/dev/null
trap - EXIT
archive="$out/meshwork-$version.oci.tar"
rm -f "$archive"
buildah "${storage[@]}" push "localhost/meshwork:$version" "oci-archive:$archive:meshwork:$version" >/dev/null
ls -l "$archive"
echo "$archive"
