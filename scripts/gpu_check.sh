#!/usr/bin/env bash
# The GPU check for one H100 (80 GB), no internet, no package index (docs/gpus-and-vllm.md).
# Before: scripts/fetch_gpu_wheels.sh here (the wheels travel in .gpu-wheels/). Then, on the GPU machine, from the
# repository root:  bash scripts/gpu_check.sh        (<= 9 minutes; prints each part's seconds)
# It exercises the CUDA code paths on the locally built tiny model: the HF backend generating on the GPU, bf16
# training in a process of its own, FSDP training on one GPU (accelerate launch, the project's FSDP options), and
# the GPU memory handed between stages (scripts/gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 ))s)"; }
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"

step "install the carried wheels (--no-deps, where the module is missing or older) into .gpu-site/"
WHEELS=.gpu-wheels
SITE="$PWD/.gpu-site"  # git-ignored; on PYTHONPATH (training subprocesses inherit it), so the image's packages stay as they are
[ -d "$WHEELS" ] || { echo "no $WHEELS/: run scripts/fetch_gpu_wheels.sh where the index is reachable" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 - "$WHEELS" "$SITE" <<'PY'
import importlib.metadata as md, importlib.util, pathlib, subprocess, sys
from packaging.version import Version
names = {"hydra_core": "hydra", "antlr4_python3_runtime": "antlr4"}
todo = []
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist, version = whl.name.split("-")[:2]
    mod = names.get(dist.lower(), dist.lower())
    try:
        have = md.version(dist) if importlib.util.find_spec(mod) is not None else None
    except md.PackageNotFoundError:
        have = "unknown"
    if have is None or (have != "unknown" and Version(have) < Version(version)):
        todo.append(str(whl))
    else:
        print("present:", mod, have)
if todo:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "-q", "--upgrade",
                    "--target", sys.argv[2], *todo], check=True)
    print("installed:", " ".join(pathlib.Path(t).name for t in todo))
PY
python3 -c "import omegaconf, hydra, trl, datasets; print('imports ok: omegaconf', omegaconf.__version__, '| trl', trl.__version__, '| datasets', datasets.__version__)"

step "memory handed between stages, bf16 and FSDP training, one small loop"
export STE_RESULTS_DIR="${STE_RESULTS_DIR:-/tmp/ste-gpu-check}"
timeout 480 python3 scripts/gpu_check.py
step "done"
