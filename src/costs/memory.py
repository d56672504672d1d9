"""Training memory per GPU and per machine, before anything runs: the model's shape (parameters, layers, vocabulary),
the state AdamW keeps per trained parameter, activations, logits, and what FSDP gathers, against the launch's
per-GPU budget (`over_budget` refuses a plan that cannot fit). Estimates, not measurements."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the launch options are passed in; src.launch imports this module
    from src.launch import LaunchConfig


@dataclass(frozen=True)
class Shape:
    params_b: float  # billions of parameters
    layers: int
    hidden: int
    vocab: int
    active_b: float | None = None  # mixture of experts: parameters each token runs through (the GPU-hours estimate)


# Published configs (config.json of each hub repo); the dry run must not download to learn a model's size.
SHAPES = {
    "meta-llama/Meta-Llama-3-70B-Instruct": Shape(70.6, 80, 8192, 128256),
    "meta-llama/Meta-Llama-3-8B-Instruct": Shape(8.03, 32, 4096, 128256),
    "mistralai/Mixtral-8x22B-Instruct-v0.1": Shape(140.6, 56, 6144, 32768, active_b=39.1),  # 2 of 8 experts per token
    "smollm2_135m": Shape(0.135, 30, 576, 49152),
    "qwen_coder_0.5b": Shape(0.494, 24, 896, 151936),
    "qwen_coder_1.5b": Shape(1.54, 28, 1536, 151936),
}


def model_shape(spec) -> Shape | None:
    """The shape of a model spec from the table above, or from its local config.json; None when unknown."""
    for key in (spec.path, spec.package, spec.name):
        if key in SHAPES:
            return SHAPES[key]
    if spec.source == "hf" and spec.path and (Path(spec.path).expanduser() / "config.json").is_file():
        c = json.loads((Path(spec.path).expanduser() / "config.json").read_text())
        c = c.get("text_config", c)
        h, n, v = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        inter = c.get("intermediate_size", 4 * (h or 0))
        if h and n and v:  # embeddings + attention (4h^2) + gated MLP (3 h i) per layer: close enough for dense models
            return Shape((2 * v * h + n * (4 * h * h + 3 * h * inter)) / 1e9, n, h, v)
    return None


def full_finetune(train_cfg) -> bool:
    """Whether the train config trains every weight (no LoRA). The train group spells it `peft: none`."""
    return str(getattr(train_cfg, "peft", "lora")).lower() in ("none", "full", "false")


def train_memory(shape: Shape, *, full: bool, world_size: int, num_machines: int, strategy: str, offload: bool,
                 batch: int, seq: int, checkpointing: bool, lora_fraction: float = 0.005) -> dict[str, float]:
    """Estimated GB (1e9 bytes) per GPU and per machine's CPU memory for training with AdamW in mixed precision.
    Each term is in the returned dict (GB), so the dry run and the tests can name what binds.

    state_total_gb: per trained parameter bf16 weight 2 + bf16 gradient 2 + fp32 master weight 4 + Adam m and v 8
    = 16 bytes; a LoRA run keeps the frozen base in bf16 (2 bytes) and trains ~`lora_fraction` of it at 16.
    FSDP full-shard divides it by the number of GPUs (`state_per_gpu_gb`); with offload it lives in CPU memory
    (`host_per_machine_gb`).
    activations_gb (Korthikanti et al. 2022, flash attention): 34*s*h bytes per layer, or with checkpointing the
    2*s*h-byte input of every layer plus one layer's 34*s*h recomputed in backward.
    logits_gb: the head's bf16 logits (2*s*vocab, kept in the output: TRL's SFTTrainer reads them for its token
    accuracy), the fp32 copy transformers' loss takes (`ForCausalLMLoss`: logits.float(), 4) and the fp32
    log-softmax cross_entropy keeps for backward (4): 10 bytes per token and vocabulary entry (128k for Llama-3).
    fsdp_units_gb (FSDP only): full-shard all-gathers one decoder layer's weights in bf16 before using it, and
    BACKWARD_PRE (accelerate_config) prefetches the next one while the current one runs; in backward the
    current unit's gradient is unsharded (bf16) too until its reduce-scatter: 3 layers' worth, 2 bytes each
    (the gradient only for trained weights).
    fsdp_root_gb (FSDP only): TRANSFORMER_BASED_WRAP wraps the decoder layers; what is left, the input
    embeddings and the output head (2*vocab*h parameters, counted untied), is the root unit, which FSDP does
    not reshard between forward and backward: its bf16 weights stay gathered all step, with their bf16
    gradient in backward when trained.
    Plus ~2 GB of CUDA context and allocator slack (`overhead_gb`)."""
    p = shape.params_b * 1e9
    state = 16 * p if full else 2 * p + 16 * lora_fraction * p
    fsdp = strategy == "fsdp"
    sbh = seq * batch * shape.hidden
    acts = (2 * sbh * shape.layers + 34 * sbh) if checkpointing else 34 * sbh * shape.layers
    logits = 10 * seq * batch * shape.vocab
    root_params = 2 * shape.vocab * shape.hidden
    layer_params = max(p - root_params, 0.0) / shape.layers
    units = (2 * 2 + (2 if full else 0)) * layer_params if fsdp else 0.0
    root = (2 + (2 if full else 0)) * root_params if fsdp else 0.0
    if offload:
        state_gpu, host = 0.0, state / num_machines
    else:
        state_gpu, host = state / (world_size if fsdp else 1), 0.0
    gb, overhead = 1e9, 2.0
    terms = {"state_per_gpu_gb": state_gpu / gb, "activations_gb": acts / gb, "logits_gb": logits / gb,
             "fsdp_units_gb": units / gb, "fsdp_root_gb": root / gb, "overhead_gb": overhead}
    return {"state_total_gb": state / gb, "per_gpu_gb": sum(terms.values()), **terms, "host_per_machine_gb": host / gb}


def train_estimate(launch: LaunchConfig, train_cfg, judge_spec) -> dict[str, float] | None:
    shape = model_shape(judge_spec)
    if shape is None:
        return None
    return train_memory(shape, full=full_finetune(train_cfg), world_size=launch.world_size, num_machines=launch.num_machines,
                        strategy=launch.strategy, offload=launch.fsdp_offload, batch=train_cfg.per_device_batch_size,
                        seq=train_cfg.max_length, checkpointing=launch.activation_checkpointing)


def over_budget(est: dict[str, float] | None, launch: LaunchConfig) -> str | None:
    """Why the estimate does not fit what `launch` asks for, or None."""
    if est is None:
        return None
    where = f"{launch.num_machines}x{launch.num_processes} GPUs ({launch.strategy}{', offload' if launch.fsdp_offload else ''})"
    if est["per_gpu_gb"] > launch.gpu_memory_gb:
        return (f"training needs ~{est['per_gpu_gb']:.0f} GB per GPU on {where}, over launch.gpu_memory_gb="
                f"{launch.gpu_memory_gb:g} ({breakdown(est)}; model state {est['state_total_gb']:.0f} GB in all)")
    if est["host_per_machine_gb"] > launch.host_memory_gb:
        return (f"training offloads ~{est['host_per_machine_gb']:.0f} GB to each machine's CPU memory, over "
                f"launch.host_memory_gb={launch.host_memory_gb:g}")
    return None


TERMS = {"state_per_gpu_gb": "state", "activations_gb": "activations", "logits_gb": "logits",
         "fsdp_units_gb": "FSDP gathered layers", "fsdp_root_gb": "embeddings+head", "overhead_gb": "overhead"}


def breakdown(est: dict[str, float]) -> str:
    """The per-GPU terms of a `train_memory` estimate, e.g. `state 35.3 + activations 13.0 + ...`."""
    return " + ".join(f"{name} {est[k]:.1f}" for k, name in TERMS.items() if est[k])
