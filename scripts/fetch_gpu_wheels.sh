#!/usr/bin/env bash
# Download (here, where the package index is reachable) the wheels scripts/gpu_check.sh installs on a GPU machine
# that has no index. Its python3 (the nvidia-h200 'cuda' image, /work/.library/device/KINDS.md) has torch (CUDA),
# transformers, peft, accelerate, pandas, pyarrow, pytest, fsspec, xxhash; not trl, datasets, dill, multiprocess,
# hydra-core, omegaconf, antlr4. gpu_check.sh installs a carried wheel where its module is missing or older.
# Into .gpu-wheels/ (git-ignored; carried with the tree, 64 MiB per call in all).
#   scripts/fetch_gpu_wheels.sh [PYTHON_VERSION]      # the GPU machine's python3, default 3.12
# vLLM is not among them (hundreds of MB): the check runs the HF backend on the GPU. Nor mlflow (its server
# dependencies are over the size limit): the check runs with tracking=none.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
OUT=.gpu-wheels
rm -rf "$OUT"
mkdir -p "$OUT"
# Pure-Python: the project's pins (pyproject.toml). --no-deps: the GPU machine keeps its own torch/transformers.
pip download --no-deps -q -d "$OUT" \
  "trl>=1.16,<1.17" "hydra-core==1.3.8" "omegaconf>=2.3,<2.4" "datasets>=5.2,<5.3" "dill" "fsspec"
# omegaconf's antlr4 runtime 4.9.3 exists only as an sdist, and the GPU machine installs wheels: build one here.
pip wheel --no-deps -q -w "$OUT" "antlr4-python3-runtime==4.9.3"
# Per Python version or compiled: wheels for the GPU machine's Python. pyarrow: datasets 5.2 needs >= 24, newer
# than the image may hold.
pip download --no-deps -q -d "$OUT" --only-binary=:all: --python-version "$PYV" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "multiprocess" "pyarrow>=24" "xxhash"
du -sh "$OUT"; ls "$OUT"
size=$(du -sm "$OUT" | cut -f1)
if [ "$size" -gt 60 ]; then echo "$OUT is ${size} MiB: over what one device call carries (64 MiB with the tree)" >&2; exit 1; fi
