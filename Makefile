# visionr1: every target sets up what it needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= .visionr1/tiny-cpu
IMAGE_REPO ?= ghcr.io/visionr1
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
FLASH_ATTN ?= 0
# make images / push (docs/images.md). GPU=1 adds the CUDA trainer image. The build steps (never
# the images) get the host's CA folder or bundle, pip config and pip cache, when they exist; set
# one empty to leave it out, e.g. BUILD_CA= PIP_CONF= where PyPI needs neither.
GPU ?= 0
BUILD_CA ?= $(wildcard /etc/ssl/certs)
PIP_CONF ?= $(wildcard /etc/pip.conf)
PIP_CACHE ?= $(HOME)/.cache/pip
INSECURE ?= auto
SEED ?= 3
ABLATIONS ?= .visionr1/ablations
# The toy model is far too small for two threads to help; one thread per stage avoids the
# OpenMP spin-waits that make a busy laptop crawl.
THREADS ?= 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[operator,train,dev]'
	touch $@

.PHONY: setup
setup: $(BIN)/.installed ## create .venv and install visionr1 with the operator, train and dev extras

.PHONY: host-deps
host-deps: ## install the Debian packages the local cluster and the image builds need (buildah, skopeo, mmdebstrap, libseccomp-dev, ...)
	@scripts/host-deps.sh

.PHONY: test
test: setup ## lint, then run the test suite (with Go installed, the cluster tests build the local cluster and our images once; without it they are set aside with one line)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@if command -v go >/dev/null; then scripts/host-deps.sh; fi
	$(BIN)/python -m pytest -q -rs

.PHONY: lint
lint: setup ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: format
format: setup ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: crd
crd: setup ## regenerate from the API models: crds/visionr1run.yaml, the chart's CRD, the manifest reference
	$(BIN)/visionr1 crd > crds/visionr1run.yaml
	$(BIN)/python -m visionr1_operator.chart_crd
	$(BIN)/visionr1 reference > docs/manifest-reference.md

.PHONY: validate-examples
validate-examples: setup ## validate every example manifest
	$(BIN)/visionr1 validate examples/*.yaml

.PHONY: demo
demo: setup ## the laptop demo: toy data + tiny model + the whole pipeline on CPU, GRPO's gain over SFT
	@# A rerun after Ctrl-C resumes from checkpoints: keep the data and model they were made with.
	test -d $(WORKDIR)/toy/bench || $(BIN)/visionr1 toy data --out $(WORKDIR)/toy --n 800 --n-rl 800 --n-bench 300 --seed 0
	test -f $(WORKDIR)/models/tiny-qwen25vl/config.json || $(BIN)/visionr1 toy model --out $(WORKDIR)/models/tiny-qwen25vl
	OMP_NUM_THREADS=$(THREADS) $(BIN)/visionr1 run-local examples/tiny-cpu.yaml --workdir $(WORKDIR)

.PHONY: ablations
ablations: setup ## the paper's ablations at toy scale (recipe, sft_only, long, zero; SEED=N) → .visionr1/ablations/summary.*
	OMP_NUM_THREADS=$(THREADS) $(BIN)/visionr1 ablations --seed $(SEED) --out $(ABLATIONS)

.PHONY: bench
bench: setup ## run every benchmark in benchmarks/ (each prints JSON)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

.PHONY: device-check-prepare
device-check-prepare: ## fetch the wheels the GPU machine lacks into .whl/ (then run scripts/device-check.sh there)
	scripts/device-check.sh prepare

.PHONY: images
images: host-deps ## build the operator, trainer-cpu and mlflow images with buildah, no daemon, on a Debian base from packages (GPU=1 adds the CUDA trainer; docs/images.md)
	$(PYTHON) scripts/images.py --tag $(TAG) --gpu $(GPU) build --build-ca "$(BUILD_CA)" \
	  --pip-conf "$(PIP_CONF)" --pip-cache "$(PIP_CACHE)" --flash-attn $(FLASH_ATTN)

.PHONY: push
push: images ## push the images to IMAGE_REPO with TAG (skopeo; INSECURE=1 for plain HTTP, auto for local addresses) and print the pinned helm install
	$(PYTHON) scripts/images.py --tag $(TAG) --gpu $(GPU) push --repo $(IMAGE_REPO) --insecure $(INSECURE)

CLUSTER := $(BIN)/python scripts/cluster/cli.py

.PHONY: cluster-up
cluster-up: setup host-deps ## start a local cluster (control plane, and a real node: kubelet, containerd, CNI, kube-proxy, CoreDNS, local-path, a registry); the first run builds it from Go modules
	@$(CLUSTER) up
	@# The CRD, so `kubectl get vr1 -A` answers at once; labelled as the README's helm release owns
	@# it, so `helm install visionr1-operator -n visionr1-system` adopts it instead of refusing.
	@eval "$$($(CLUSTER) env)" && kubectl apply -f crds/visionr1run.yaml >/dev/null \
	  && kubectl label crd visionr1runs.visionr1.io app.kubernetes.io/managed-by=Helm --overwrite >/dev/null \
	  && kubectl annotate crd visionr1runs.visionr1.io meta.helm.sh/release-name=visionr1-operator \
	     meta.helm.sh/release-namespace=visionr1-system --overwrite >/dev/null \
	  && echo "VisionR1Run CRD installed (helm install visionr1-operator -n visionr1-system adopts it)"

.PHONY: cluster-down
cluster-down: setup ## stop the local cluster: pods, processes, mounts, cgroups, its network namespace
	@$(CLUSTER) down

.PHONY: cluster-status
cluster-status: setup ## what the local control plane runs and whether it is healthy
	@$(CLUSTER) status

.PHONY: e2e
e2e: setup host-deps ## only the tests against the local cluster (pytest -m cluster)
	$(BIN)/python -m pytest -q -rs -m cluster

.PHONY: kueue-up
kueue-up: setup ## real Kueue (built once from its module) on the running local control plane
	$(BIN)/python scripts/cluster/kueue.py up

.PHONY: kueue-down
kueue-down: setup ## stop Kueue and remove its webhooks (its CRDs and queues stay)
	$(BIN)/python scripts/cluster/kueue.py down

.PHONY: clean
clean: ## remove the demo workspace and caches (keeps .venv)
	rm -rf .visionr1/tiny-cpu $(ABLATIONS) .pytest_cache .ruff_cache
