"""Benchmark: one LoRA training step of the CPU default's judge on CPU, gradient checkpointing on/off, eager vs SDPA
attention, side by side in one run (docs/training-and-launch.md).

    python scripts/bench_train_step.py [--model smollm2_135m] [--tokens 484] [--batch 2] [--steps 4]

Random token ids (the cost of a step does not depend on their values); the first step is a warm-up and not counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--tokens", type=int, default=484)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from src.models.base import ModelSpec
    from src.models.loading import load_for_training

    spec = ModelSpec(name=args.model, source="packaged", package=args.model, backend="hf")
    print(f"{args.model}, LoRA r=8 on q/k/v/o, {args.batch} x {args.tokens} tokens per step, torch threads {torch.get_num_threads()}")
    for attn in ("eager", "sdpa"):
        for checkpointing in (True, False):
            model, _ = load_for_training(dataclasses.replace(spec, attn_implementation=attn))
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                     task_type="CAUSAL_LM"))
            if checkpointing:  # as TRL enables it: non-reentrant, inputs requiring grad
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            ids = torch.randint(100, model.config.vocab_size - 100, (args.batch, args.tokens))
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t0)
            per_step = sum(times[1:]) / max(1, len(times) - 1)
            print(f"attention {attn:5s}  gradient checkpointing {'on ' if checkpointing else 'off'}  {per_step:6.2f} s/step")


if __name__ == "__main__":
    main()
