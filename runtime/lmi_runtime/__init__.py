"""lmi-runtime: LMI configuration to the vLLM async engine, served over the LMI and OpenAI APIs."""
