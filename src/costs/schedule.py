"""The training schedule a plan implies, per train stage: expected examples, global batch, optimizer steps, warm-up.

Pure functions of the typed job config, so the dry run prints them before anything loads, and a schedule whose
optimizer steps do not exceed its warm-up (the learning rate would never reach its peak) is refused at plan time.
Expected examples assume no pair is dropped and one example per pair and order (filter=all: one per judgment).
"""
from __future__ import annotations

import math

from src.config import ConfigError


def expected_examples(job) -> int:
    d, jg = job.dataset, job.judging
    orders = 2 if jg.both_orders else 1
    per = jg.n if job.filter.name == "all" else 1
    return int(d.limit * (1 - d.heldout_fraction)) * orders * per


def train_schedule(job) -> dict[str, int]:
    """{examples, global_batch, steps, warmup} of one iteration's train stage."""
    t, la = job.train, job.launch
    examples = expected_examples(job)
    global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * la.world_size
    steps = t.max_steps if t.max_steps > 0 else math.ceil(examples / global_batch) * t.num_epochs
    return {"examples": examples, "global_batch": global_batch, "steps": steps, "warmup": t.warmup_steps}


def check_schedule(job) -> None:
    """One-line ConfigError when the warm-up takes every optimizer step."""
    if not job.iterations:
        return
    s = train_schedule(job)
    if s["warmup"] > 0 and s["steps"] <= s["warmup"]:
        raise ConfigError(
            f"train: {s['steps']} optimizer steps ({s['examples']} examples / global batch {s['global_batch']} x "
            f"{job.train.num_epochs} epochs) do not exceed train.warmup_steps={s['warmup']}: lower the warm-up, "
            f"the batch (train.gradient_accumulation_steps, per_device_batch_size, launch) or raise the data")


def describe(job) -> str:
    if not job.iterations:
        return "  train schedule: no train stage"
    s = train_schedule(job)
    return (f"  train schedule (per iteration, train 1..{job.iterations}): ~{s['examples']:,} examples, global batch "
            f"{s['global_batch']} ({job.train.per_device_batch_size} x {job.train.gradient_accumulation_steps} accumulation x "
            f"{job.launch.world_size} processes), {s['steps']:,} optimizer steps, {s['warmup']} warm-up")
