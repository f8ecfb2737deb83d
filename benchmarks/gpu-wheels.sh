#!/usr/bin/env bash
# Fetch, on a machine with the package registry, the wheels that benchmarks/gpu-check.sh installs
# on a GPU machine that has none (its python3 has torch, transformers, triton, pluggy, einops,
# safetensors, regex and pillow, but not omegaconf). They land in .whl/ (ignored by git), which
# travels with the working tree to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl
# omegaconf is pure Python (2.4 needs only PyYAML, which the GPU image has): the version CI tests with.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "omegaconf==2.4.0"
ls -l .whl
