#!/usr/bin/env bash
# The GPU check: selection and end-to-end tables and every speed target PASS/FAIL, in one
# command, in about 7.5 minutes on one H200 (measured 2026-12-04; 6.4 of them end to end) whose python3 has torch, transformers and
# triton. Run benchmarks/gpu-wheels.sh first where the package registry is reachable: the
# GPU machine installs omegaconf (and resprune itself) offline from .whl/ and this checkout.
#
#     bash benchmarks/gpu-check.sh              # writes gpu-check.md / .json to $OUT (or .)
#     bash benchmarks/gpu-check.sh --no-e2e     # the selection part only (under a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
site="${TMPDIR:-/tmp}/resprune-gpu-site"
rm -rf "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
# resprune itself, laid out as its wheel would be (strategies/ and backbones/ inside the package)
cp -r resprune "$site/resprune" && cp -r strategies "$site/resprune/strategies" && cp -r backbones "$site/resprune/backbones"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
out="${OUT:-.}"
mkdir -p "$out"
# The CUDA tests, and the video packing against transformers' own video processor (the GPU image has
# torchvision; the CPU machines do not). A failing test is reported, and the timings still run.
python3 -P -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_residual_energy_properties.py \
    tests/test_video.py -k "cuda or real_video_processor" >"$out/gpu-tests.log" 2>&1 \
    && echo "GPU tests: passed" || echo "GPU tests: FAILED (rc $?)"
tail -5 "$out/gpu-tests.log"
python3 -P -m resprune.kernels.compile --arch 90 || echo "kernel compile: FAILED"
python3 benchmarks/gpu_check.py --out "$out" "$@"
