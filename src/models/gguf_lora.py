"""Convert a PEFT LoRA adapter into a llama.cpp GGUF LoRA adapter.

The train stage fine-tunes an fp32 transformers copy of a model that transformers' GGUF loader converted
from a packaged GGUF file; the llama.cpp engine loads that ORIGINAL (quantised) GGUF file and must wear the
adapter. This module does what llama.cpp's `convert_lora_to_gguf.py` does for that case, but takes every
fact about the base from the base GGUF itself (architecture, block count, head counts, tensor shapes)
rather than from an HF config.json, and refuses, instead of silently mis-converting, the PEFT features
llama.cpp's plain LoRA cannot express.

What the reference converter does, and so what is done here (llama.cpp vendored in llama-cpp-python 0.3.36):
- tensor names: the HF module name with PEFT's `base_model.model.` prefix stripped goes through gguf's
  `TensorNameMap` for the architecture (`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q`), and
  `.lora_A.weight` / `.lora_B.weight` become `<gguf name>.weight.lora_a` / `.lora_b`;
- shapes: A stays (rank, in_features) and B (out_features, rank) in torch order; the GGUF writer reverses
  the dims, which is what llama-adapter.cpp checks against the base tensor (a.ne0 == in, b.ne1 == out);
- q/k permutation: `LlamaModel.modify_tensors` (conversion/llama.py, `undo_permute = True`) permutes the
  rows of q_proj (by n_head) and k_proj (by n_head_kv) into llama.cpp's rope layout, and the LoRA
  converter applies that permutation to lora_B only (`LoraTorchTensor.permute` touches B when the last dim
  is kept). `Qwen2Model` (conversion/qwen.py) uses `TextModel.modify_tensors`, with no permutation;
- metadata: general.architecture (the base's), general.type = "adapter", adapter.type = "lora",
  adapter.lora.alpha = lora_alpha; llama.cpp then scales B·A by alpha / rank (rank read from the tensor),
  which equals PEFT's lora_alpha / r when rslora and per-module patterns are off.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

# Architectures whose convert_hf_to_gguf class was checked for a q/k row permutation. An architecture not
# listed is refused: guessing wrong does not fail loudly in llama.cpp, it just gives a wrong adapter.
# llama: conversion/llama.py LlamaModel, undo_permute = True (rope layout of q/k rows).
# qwen2: conversion/qwen.py Qwen2Model -> TextModel.modify_tensors, no permutation.
_PERMUTES_QK: dict[str, bool] = {"llama": True, "qwen2": False}

_PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b"}

# adapter_config.json keys that, when set, change what the adapter computes (or what base it needs) in a
# way llama.cpp's plain LoRA (W + alpha/r * B·A on existing tensors) cannot reproduce.
_MUST_BE_UNSET = (
    "use_dora",  # adds a learned magnitude vector per module
    "use_rslora",  # scales by alpha / sqrt(r), llama.cpp by alpha / r
    "modules_to_save",  # whole trained copies of modules, not low-rank deltas
    "rank_pattern",  # per-module ranks/alphas: llama.cpp has one alpha per file
    "alpha_pattern",
    "lora_bias",  # a trained bias on lora_B
    "trainable_token_indices",  # trained embedding rows
    "layer_replication",  # changes the base's layer stack
    "alora_invocation_tokens",  # activated LoRA, needs tokenizer-dependent metadata not written here
    "target_parameters",  # LoRA on raw nn.Parameters (MoE experts), not on named modules
    "use_qalora",
    "use_bdlora",
    "megatron_config",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
)

# init_lora_weights values that rewrite the BASE weights (the residual after pulling out the principal or
# quantisation component); such an adapter is only right on that rewritten base, not on the packaged GGUF.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _refuse(config_path: Path, key: str, why: str) -> ValueError:
    return ValueError(f"{config_path}: {key}: {why}; write_lora_gguf cannot convert this adapter for llama.cpp")


def _check_config(config: dict[str, Any], config_path: Path) -> tuple[int, float]:
    """Validate adapter_config.json; return (r, lora_alpha)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _refuse(config_path, "peft_type", f"is {peft_type!r}, only 'LORA' is supported")
    for key in _MUST_BE_UNSET:
        if config.get(key):
            raise _refuse(config_path, key, f"is set ({config[key]!r})")
    bias = config.get("bias", "none")
    if bias != "none":
        raise _refuse(config_path, "bias", f"is {bias!r}: trained biases are not LoRA tensors; only 'none'")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _refuse(config_path, "init_lora_weights", f"is {init!r}, which rewrites the base weights")
    r = config.get("r")
    alpha = config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0:
        raise _refuse(config_path, "r", f"is {r!r}, expected a positive int")
    # llama.cpp treats alpha == 0 as "no scaling" (scale 1), PEFT as scale 0: refuse rather than differ.
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise _refuse(config_path, "lora_alpha", f"is {alpha!r}, expected a positive number")
    return r, float(alpha)


def _field(reader: gguf.GGUFReader, key: str, path: Path) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"{path}: base GGUF has no metadata key {key!r}")
    return field.contents()


def _permute_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute on the rows (out_features) of lora_B.

    Each head's rows go from HF's rotate_half layout (first half, second half) to llama.cpp's interleaved
    rope layout; the base GGUF's attn_q/attn_k rows are in that layout, so B must be too.
    """
    out = b.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"lora_B has {out} rows, not divisible by 2 * n_head = {2 * n_head}")
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def write_lora_gguf(adapter_dir: str | Path, base_gguf: str | Path, out_path: str | Path) -> Path:
    """Convert a PEFT LoRA adapter into a llama.cpp GGUF LoRA adapter for the base GGUF model `base_gguf`.

    `adapter_dir` holds `adapter_config.json` and `adapter_model.safetensors` (PEFT save_pretrained) of a
    LoRA trained on the transformers model converted from `base_gguf`. Writes float32 tensors to
    `out_path` atomically and returns it. Raises ValueError, naming the file and key, for anything that
    cannot be converted faithfully.
    """
    adapter_dir, base_gguf, out_path = Path(adapter_dir), Path(base_gguf), Path(out_path)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    r, alpha = _check_config(config, config_path)
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: not found (only safetensors adapters are supported)")

    reader = gguf.GGUFReader(base_gguf)
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE, base_gguf)
    if arch not in _PERMUTES_QK:
        raise ValueError(
            f"{base_gguf}: general.architecture is {arch!r}; supported: {sorted(_PERMUTES_QK)} "
            "(each needs its q/k layout checked against convert_hf_to_gguf before it is added)"
        )
    n_blocks = int(_field(reader, f"{arch}.block_count", base_gguf))
    n_head = int(_field(reader, f"{arch}.attention.head_count", base_gguf))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", base_gguf))
    # GGUF stores ggml ne order: (in_features, out_features) for a torch (out, in) weight.
    base_shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, n_blocks)

    # Pair up A and B per HF module, e.g. "model.layers.3.self_attn.q_proj" -> {"lora_a": A, "lora_b": B}.
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path, device="cpu").items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PEFT_PREFIX):
            # DoRA magnitudes, biases, embeddings (lora_embedding_A/B), saved whole modules...
            raise ValueError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight of a linear module")
        module = key[len(_PEFT_PREFIX) : -len(suffix)]
        pairs.setdefault(module, {})[_LORA_SUFFIXES[suffix]] = tensor.to(torch.float32)
    if not pairs:
        raise ValueError(f"{weights_path}: no LoRA tensors")

    out_tensors: list[tuple[str, np.ndarray]] = []
    for module in sorted(pairs):
        ab = pairs[module]
        if set(ab) != {"lora_a", "lora_b"}:
            raise ValueError(f"{weights_path}: module {module!r} lacks lora_A or lora_B")
        a, b = ab["lora_a"], ab["lora_b"]
        gguf_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None or gguf_name not in base_shapes:
            # e.g. lm_head on a tied-embedding model: the base GGUF has no output.weight to add a delta to.
            raise ValueError(
                f"{config_path}: target_modules: module {module!r} has no tensor in base {base_gguf.name}"
                f" (mapped to {gguf_name!r})"
            )
        in_features, out_features = base_shapes[gguf_name][:2]
        if a.ndim != 2 or b.ndim != 2 or a.shape != (r, in_features) or b.shape != (out_features, r):
            raise ValueError(
                f"{weights_path}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"r={r} and base tensor {gguf_name} (out={out_features}, in={in_features})"
            )
        if _PERMUTES_QK[arch]:
            # The base GGUF holds permuted q/k rows, so the delta B·A must be permuted the same way;
            # permuting B's rows does exactly that (A is on the input side and stays).
            if module.endswith(".self_attn.q_proj"):
                b = _permute_rows(b, n_head)
            elif module.endswith(".self_attn.k_proj"):
                b = _permute_rows(b, n_head_kv)
        out_tensors.append((gguf_name + ".lora_a", a.contiguous().numpy()))
        out_tensors.append((gguf_name + ".lora_b", b.contiguous().numpy()))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch)  # also writes general.architecture = arch
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in out_tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path
