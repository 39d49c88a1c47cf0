"""lmi-operator: serve LLMs on Kubernetes with vLLM, the LMI way."""
