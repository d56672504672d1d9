"""The CUDA half of scripts/gpu_check.sh (one GPU, no hub: the locally built tiny model, a written pool).

1. memory handed between stages: a generator on the GPU, the pool closed -> nothing left allocated or cached;
   training in a process of its own (launch=gpu1, bf16 on a bf16 GPU) -> the GPU as free after as before;
   training in this process -> freed after; FSDP (full shard, the project's FSDP options) in one process.
2. one small loop (select, generate, evaluate, judge, filter, train, evaluate) with launch=gpu1 and the HF backend
   on the GPU; each stage's seconds from its cache entry.
Exits non-zero on the first failed check.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from src import launch  # noqa: E402
from src.launch import LaunchConfig, run_train  # noqa: E402
from src.models.base import ModelSpec, SamplingConfig  # noqa: E402
from src.runner import ModelPool  # noqa: E402
from src.records import TrainExample  # noqa: E402
from src.stages.train import TrainConfig  # noqa: E402

MB = 2**20
T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def check(ok: bool, what: str) -> None:
    say(("OK   " if ok else "FAIL ") + what)
    if not ok:
        sys.exit(1)


def run_train_fsdp_one_gpu(cfg: TrainConfig, examples: list, spec: ModelSpec, cache: Path, out: Path) -> tuple[dict, dict]:
    """run_train with strategy=fsdp in one process; (its stats, the accelerate config it wrote)."""
    real = launch.accelerate_config

    def one_process(lc: LaunchConfig, cpu: bool) -> dict:
        return {**real(dataclasses.replace(lc, num_processes=2), cpu), "num_processes": 1}

    launch.accelerate_config = one_process
    try:
        stats = run_train(LaunchConfig(subprocess=True, strategy="fsdp", main_process_port=29572), cfg, examples, spec, cache, None, out, 0, False)
    finally:
        launch.accelerate_config = real
    return stats, json.loads((out / "accelerate.json").read_text())


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    say(f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}, torch {torch.__version__}")
    work = Path(os.environ.get("STE_RESULTS_DIR", tempfile.mkdtemp(prefix="ste-gpu-")))
    cache = work / "models"
    spec = ModelSpec(name="tiny_random", source="tiny_random")
    free0, total = torch.cuda.mem_get_info()

    # 1a. generation on the GPU, then the pool closed
    t = time.time()
    pool = ModelPool(cache, capacity=1)
    gen = pool.get(spec, None)
    check(str(gen.device).startswith("cuda"), f"HF backend on {gen.device}")
    out = gen.generate(["Is 17 prime? Explain."] * 8, SamplingConfig(max_new_tokens=16, temperature=0.7, n=2, seed=1))
    check(len(out) == 8 and all(len(c) == 2 for c in out), f"generated 8x2 samples on the GPU in {time.time() - t:.1f}s")
    held = torch.cuda.memory_allocated()
    pool.close()
    check(held > 0 and torch.cuda.memory_allocated() == 0 and torch.cuda.memory_reserved() == 0,
          f"pool closed: {held / MB:.1f} MiB allocated before, {torch.cuda.memory_allocated() / MB:.1f} allocated and "
          f"{torch.cuda.memory_reserved() / MB:.1f} reserved after")

    examples = [TrainExample(f"p{i}", o, f"Which answer is better for question {i}? A: yes. B: no.",
                             f"A answers it. [[{'A' if o == 'chosen_first' else 'B'}]]", "A" if o == "chosen_first" else "B")
                for i in range(8) for o in ("chosen_first", "chosen_second")]
    cfg = TrainConfig(num_epochs=1, per_device_batch_size=4, max_length=512, lora_r=4, learning_rate=5e-3)

    # 1b. training in a process of its own
    t = time.time()
    stats = run_train(LaunchConfig(subprocess=True, main_process_port=29571), cfg, examples, spec, cache, None, work / "train-sub", 0, False)
    free1, _ = torch.cuda.mem_get_info()
    check(stats["trained"] and stats["steps"] == 4, f"train in its own process: {stats['steps']} steps, loss {stats['first_loss']:.3f} -> "
          f"{stats['last_loss']:.3f}, {time.time() - t:.1f}s (bf16 mixed precision: {torch.cuda.is_bf16_supported()})")
    check(free1 >= free0 - 64 * MB, f"GPU free after the training process: {free1 / MB:.0f} of {total / MB:.0f} MiB (before: {free0 / MB:.0f})")

    # 1c. training in this process, freed after
    t = time.time()
    stats = run_train(LaunchConfig(), cfg, examples, spec, cache, None, work / "train-in", 0, False)
    check(stats["trained"] and torch.cuda.memory_allocated() < 8 * MB,
          f"train in this process: {time.time() - t:.1f}s, {torch.cuda.memory_allocated() / MB:.1f} MiB still allocated after")

    # 1d. FSDP on one GPU: the project's FSDP options (accelerate_config writes them only for world_size > 1, so
    #     they are taken from a 2-process launch) in a 1-process accelerate launch, through the same request,
    #     worker and train.run as every launch; FSDP's own activation checkpointing, the trainer's off.
    t = time.time()
    stats, acc = run_train_fsdp_one_gpu(cfg, examples, spec, cache, work / "train-fsdp")
    free2, _ = torch.cuda.mem_get_info()
    check(acc["distributed_type"] == "FSDP" and acc["num_processes"] == 1 and acc["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD",
          f"FSDP launch config: {acc['distributed_type']}, {acc['num_processes']} process, {acc['fsdp_config']['fsdp_sharding_strategy']}")
    check(stats["trained"] and stats["steps"] == 4, f"FSDP train (1 process): {stats['steps']} steps, loss {stats['first_loss']:.3f} -> "
          f"{stats['last_loss']:.3f}, {time.time() - t:.1f}s")
    check(free2 >= free0 - 64 * MB, f"GPU free after the FSDP process: {free2 / MB:.0f} of {total / MB:.0f} MiB (before: {free0 / MB:.0f})")

    # 2. one small loop through the CLI
    data = work / "data"
    pool_file = data / "instructions" / "sharegpt_v3_first_turn_prompts.jsonl.gz"
    pool_file.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(pool_file, "wt") as f:
        for i in range(40):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"A train leaves at {i} o'clock at {40 + i} km/h. When has it covered {80 + 2 * i} km? Explain."}) + "\n")
    results = work / "results"
    cmd = [sys.executable, "-m", "src.main", f"data_root={data}", f"results_dir={results}", f"pipeline.model_cache_dir={cache}",
           "seed=tiny_random", "judge=tiny_random", "dataset=reasoning", "dataset.limit=12", "dataset.categories=[reasoning]",
           "dataset.max_scan=24", "dataset.heldout_fraction=0.34", "negatives.answer_max_new_tokens=32",
           "negatives.modify_max_new_tokens=32", "judging.n=4", "judging.max_new_tokens=32", "judging.max_response_chars=150",
           "eval.max_new_tokens=32", "eval.max_response_chars=150", "eval.rewardbench.enabled=false", "eval.mtbench.enabled=false",
           "train.per_device_batch_size=4", "filter.balance=false", "filter=all", "iterations=1", "tracking=none", "launch=gpu1",
           "~hydra.callbacks.report"]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    check(proc.returncode == 0, f"loop (launch=gpu1, HF backend on the GPU) in {time.time() - t:.1f}s")
    for meta in sorted((results / "cache").glob("*/*/meta.json"), key=lambda p: json.loads(p.read_text())["created"]):
        m = json.loads(meta.read_text())
        print(f"    {m['stage']:<10} iter {m.get('iteration', '-')}: {m['seconds']:7.1f}s", flush=True)


if __name__ == "__main__":
    main()
