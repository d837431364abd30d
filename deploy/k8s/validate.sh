#!/usr/bin/env bash
# Validates the Kubernetes manifests offline: each overlay rendered with
# kustomize (Debian's kubectl), every object checked against the Kubernetes
# API schemas (kubernetes-validate from PyPI, strict: unknown fields fail),
# then our own rules: Meshwork's containers run as non-root with probes, and
# every flag they pass exists in the binary (`meshwork ... --help`).
#
#   deploy/k8s/validate.sh [path/to/meshwork]    # KUBERNETES_VERSION=1.30.0 by default
set -euo pipefail
bin=${1:-}
if [ -n "$bin" ]; then bin=$(realpath "$bin"); fi
cd "$(dirname "$0")"
version=${KUBERNETES_VERSION:-1.30.0}
venv=${KUBERNETES_VALIDATE_VENV:-/opt/meshwork-kv}
if ! "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" > "$out/$name.yaml"
  echo "== $name: $(grep -c '^kind:' "$out/$name.yaml") objects"
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$out/$name.yaml"
  "$venv/bin/python" - "$out/$name.yaml" "$bin" <<'PY'
import subprocess, sys, yaml
path, binary = sys.argv[1], sys.argv[2]
helps = {}
def flags_of(cmd):
    if cmd not in helps:
        text = subprocess.run([binary, *cmd, "--help"], capture_output=True, text=True, check=True).stdout
        helps[cmd] = {w.split("=")[0].rstrip(",") for w in text.split() if w.startswith("--")}
    return helps[cmd]
bad = []
for doc in yaml.safe_load_all(open(path)):
    spec = (doc or {}).get("spec", {})
    pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if not pod:
        continue
    where = f'{doc["kind"]}/{doc["metadata"]["name"]}'
    for c in pod["containers"]:
        if c["image"].split(":")[0].split("/")[-1] != "meshwork":
            continue
        sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        if not sc.get("runAsNonRoot") or sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: runs as root or may escalate")
        if doc["kind"] != "Job" and not ("readinessProbe" in c and "livenessProbe" in c):
            bad.append(f"{where}: no readiness or liveness probe")
        args = c.get("args", [])
        cmd = tuple(a for a in args[:2] if not a.startswith("-"))
        if cmd and cmd[0] == "demo":
            cmd = tuple(args[:2])
        if binary:
            known = flags_of(cmd)
            for a in args:
                if a.startswith("--") and a.split("=")[0] not in known:
                    bad.append(f"{where}: `meshwork {' '.join(cmd)}` has no flag {a.split('=')[0]}")
if bad:
    print("\n".join(bad)); sys.exit(1)
print("our rules ok" + ("" if binary else " (flags not checked: no binary given)"))
PY
done
echo "== manifests valid"
