#!/usr/bin/env bash
# The GPU check for one H100 (80 GB), no internet, no package index (README: Running on GPUs).
# Before: scripts/fetch_gpu_wheels.sh here (the wheels travel in .gpu-wheels/). Then, on the GPU machine, from the
# repository root:  bash scripts/gpu_check.sh        (<= 8 minutes; prints each part's seconds)
# It exercises the CUDA code paths on the locally built tiny model: the HF backend generating on the GPU, bf16
# training in a process of its own, and the GPU memory handed between stages (scripts/gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 ))s)"; }
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"

step "install the carried wheels (--no-deps, only what is missing)"
WHEELS=.gpu-wheels
[ -d "$WHEELS" ] || { echo "no $WHEELS/: run scripts/fetch_gpu_wheels.sh where the index is reachable" >&2; exit 1; }
python3 - "$WHEELS" <<'PY'
import importlib.util, pathlib, subprocess, sys
names = {"hydra_core": "hydra", "antlr4_python3_runtime": "antlr4", "pytest": "pytest"}
todo = []
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0].lower()
    mod = names.get(dist, dist)
    if importlib.util.find_spec(mod) is None:
        todo.append(str(whl))
    else:
        print("present:", mod)
if todo:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", *todo], check=True)
    print("installed:", " ".join(pathlib.Path(t).name for t in todo))
PY

step "memory handed between stages, bf16 training, one small loop"
export STE_RESULTS_DIR="${STE_RESULTS_DIR:-/tmp/ste-gpu-check}"
timeout 420 python3 scripts/gpu_check.py
step "done"
