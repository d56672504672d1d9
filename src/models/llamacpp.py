"""`Generator` on llama.cpp (llama-cpp-python): the CPU engine. Same contract as `hf.HFGenerator`.

Why: on 2 CPU cores the transformers path is bound by fp32 weights and by prefill; llama.cpp runs the packaged
quantised GGUF files as they are, and batches sequences that share a prefix (measured: docs/cpu-engine.md). It is an optional dependency (`pip install -e .[cpu]` builds it from the sdist); `loading.preflight`
names it when a spec asks for it and it is missing, and `backend: auto` falls back to HF with one line.

What is shared with the HF backend, so the two agree on everything but arithmetic:
  * tokens: prompts are rendered and tokenized by the HF tokenizer of the model's converted directory (the GGUF's
    own vocabulary, converted), and llama.cpp is fed token ids; completions are decoded by the same tokenizer;
  * the stop set (generation_config + tokenizer eos), the prompt-length rule, the plan of a constrained choice;
  * sampling is exactly temperature + top-p (HF's TopPLogitsWarper rule, no top-k), done here in numpy on the
    engine's logits with one generator per (prompt seed, sample).

Engine use (the low-level bindings; the high-level `Llama` class decodes one sequence at a time):
  * sequence slots, each with its own KV stream: a slot takes over any prefix another slot holds by copying its
    cells (a prefix cache, as vLLM's; a memory copy, not a recomputation): the judge template's preamble is
    decoded once, a prompt once for its n samples, and a constrained verdict read after a judgment reuses prompt +
    judgment. Per-slot streams, not one unified buffer: with a unified buffer every token attends over all slots'
    cells (masked), which halved decoding at 16 slots of 500 tokens (measured: docs/cpu-engine.md);
  * all sample slots of a group decode together, one token each per step (one llama_decode batch);
  * flash attention off: on these CPUs it decoded 16 slots at 0.65x the plain kernel (it prefills ~1.2x faster, but
    a judge stage decodes more than it prefills once the prefix cache has done its part);
  * `extra.gguf_type` re-encodes the packaged GGUF once (e.g. SmolLM2's Q4_1 as f32: the same values, dequantized
    exactly as the HF backend holds them, and 2.1x faster to prefill here than ggml's Q4_1 kernels).
`generate` and `score_options` start from an empty cache, so each call's output is a function of that call alone
(a resumed chunk recomputes exactly what an uninterrupted run computed); `choose` keeps what the call before it
left, because it is the read that follows a chunk's `generate` (stages/judge.py: a judgment without a verdict is
read again as prompt + judgment + verdict prefix, now served from the cache).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from src.models.base import Completion, ModelSpec, Prompt, SamplingConfig, chat_messages
from src.models.prompts import check_prompt_length, plan_choices, plan_scores

log = logging.getLogger(__name__)

DIST = "llama-cpp-python"  # the distribution whose version keys outputs (base.engine_versions)
# extra.gguf_type values: llama.cpp's file types a packaged GGUF can be re-encoded to (llama_model_quantize).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# ------------------------------------------------------------------------------------------- pure sampling
def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None) -> int:
    """One token from `logits`: argmax when temperature <= 0, else temperature then nucleus (top-p) sampling.

    The nucleus is transformers' TopPLogitsWarper rule: in descending probability, a token is kept when the mass
    of the tokens ranked above it is < top_p (so the most likely token is always kept). The top 1,024 are sorted
    first; the full vocabulary only when they hold less than top_p (a very flat distribution)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    x -= x.max()
    p = np.exp(x)
    p /= p.sum()
    if top_p < 1.0:
        k = min(p.size, 1024)
        top = np.argpartition(-p, k - 1)[:k] if k < p.size else np.arange(p.size)
        order = top[np.argsort(-p[top], kind="stable")]
        mass = np.cumsum(p[order])
        if mass[-1] < top_p and k < p.size:
            order = np.argsort(-p, kind="stable")
            mass = np.cumsum(p[order])
        above = np.concatenate(([0.0], mass[:-1]))  # mass ranked strictly above each token
        kept = order[above < top_p]
        q = p[kept] / p[kept].sum()
        return int(kept[min(int(np.searchsorted(np.cumsum(q), rng.random() * q.sum(), side="right")), kept.size - 1)])
    return int(min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), p.size - 1))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common token prefix of a and b."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return next(i for i in range(n) if a[i] != b[i])


# ------------------------------------------------------------------------------------------- LoRA adapters
def adapter_gguf(adapter_dir: str | Path, base_gguf: str | Path, cache_dir: str | Path) -> Path:
    """The llama.cpp GGUF form of a PEFT LoRA adapter directory, converted once and kept under cache_dir by the
    hash of the adapter's files and the base model (an adapter is retrained under a new train key, so a hash of
    its bytes is its identity)."""
    from src.models.gguf_lora import write_lora_gguf

    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        f = Path(adapter_dir) / name
        if not f.is_file():
            raise FileNotFoundError(f"{adapter_dir}: not a PEFT LoRA adapter (no {name})")
        h.update(name.encode() + f.read_bytes())
    h.update(Path(base_gguf).name.encode())
    out = Path(cache_dir) / "lora-gguf" / f"{h.hexdigest()[:24]}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        write_lora_gguf(adapter_dir, base_gguf, out)
        log.info("converted adapter %s to GGUF %s in %.1f s", adapter_dir, out, time.time() - t0)
    return out


def gguf_type_problem(gguf_type) -> str | None:
    """Why `extra.gguf_type` is not a file type the engine can re-encode to, or None (loading.preflight asks before
    anything runs; engine_gguf again before it writes)."""
    if gguf_type is None or gguf_type in GGUF_TYPES:
        return None
    return f"extra.gguf_type={gguf_type!r}: one of {GGUF_TYPES} or null (the packaged file as it is)"


def engine_gguf(packaged: str | Path, gguf_type: str | None, cache_dir: str | Path, source_sha256: str) -> Path:
    """The GGUF file the engine loads: the packaged one (`packaged`, verified by the caller to hash to
    `source_sha256`), or (gguf_type set) its re-encoding as that file type, made once with llama.cpp's own quantizer
    and kept under cache_dir by the source's hash. Re-encoding a quantised file as f32 is exact (each weight
    dequantized to the value the HF backend holds); q8_0 is not. As every file in the shared, writable model cache,
    the re-encoding is used only when it still hashes to what was written (a sidecar `.sha256`); else it is set
    aside and made again."""
    from src.models.store import set_aside, sha256_file

    if gguf_type is None:
        return Path(packaged)
    why = gguf_type_problem(gguf_type)
    if why:
        raise ValueError(why)
    out = Path(cache_dir) / "gguf" / f"{source_sha256[:12]}-{Path(packaged).stem}.{gguf_type}.gguf"
    sidecar = out.with_name(out.name + ".sha256")
    if out.is_file():
        if sidecar.is_file() and sha256_file(out) == sidecar.read_text().strip():
            return out
        log.warning("%s: not the re-encoding that was written; set aside as %s, re-encoding", out, set_aside(out))
    import llama_cpp as L
    from llama_cpp import _logger

    _logger.set_verbose(False)  # the quantizer logs every tensor otherwise
    ftype = {"f32": L.LLAMA_FTYPE_ALL_F32, "f16": L.LLAMA_FTYPE_MOSTLY_F16, "bf16": L.LLAMA_FTYPE_MOSTLY_BF16,
             "q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0}[gguf_type]
    params = L.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    t0 = time.time()
    if L.llama_model_quantize(str(packaged).encode(), str(tmp).encode(), params) != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not re-encode {packaged} as {gguf_type}")
    sidecar.write_text(sha256_file(tmp) + "\n")
    os.replace(tmp, out)  # whole or absent: a killed conversion leaves no file the next load would trust
    log.info("re-encoded %s as %s (%s) in %.1f s", packaged, gguf_type, out, time.time() - t0)
    return out


# ------------------------------------------------------------------------------------------- the generator
def model_params(defaults, extra_bufts: bool = False):
    """llama.cpp's model parameters (`defaults`: llama_model_default_params()) as the engine loads every model: no
    extra buffer types (weight repacking, AMX)
    unless a model's `extra.extra_bufts` asks. A build made where the CPU lists AMX uses AMX tiles (`ldtilecfg`),
    and in a VM that lists AMX without enabling it every decode segfaults (seen on these machines: the whole process
    killed at the first decode); plain CPU buffers run on any x86-64 the build runs on."""
    defaults.use_extra_bufts = extra_bufts
    return defaults


class LlamaCppGenerator:
    """Implements `base.Generator` on llama.cpp. spec.extra: {"slots": sequence slots (default 16: 8 prompts x 2
    samples decode together), "n_threads": threads (default: all cores), "n_batch": tokens per decode call,
    "gguf_type": the packaged file re-encoded (`engine_gguf`; read by loading.load_generator), "extra_bufts":
    llama.cpp's extra buffer types (`model_params`), "verbose": llama.cpp's own log}. Each slot holds up to
    spec.max_model_len tokens."""

    def __init__(self, spec: ModelSpec, model_dir: str | Path, gguf_path: str | Path, adapter_gguf_path: str | Path | None = None):
        import llama_cpp as L
        from transformers import AutoTokenizer, GenerationConfig

        self.L = L
        self.spec = spec
        self.model_dir = Path(model_dir)
        self.gguf_path = Path(gguf_path)
        self.adapter = adapter_gguf_path
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(model_dir)
        if spec.chat_template:
            tok.chat_template = spec.chat_template
        if not tok.chat_template:
            raise ValueError(f"model {spec.name!r} has no chat template; set chat_template in its model config")
        self.tokenizer = tok
        try:
            g = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json
            g = None
        eos = [g] if isinstance(g, int) else list(g or [])
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)
        if not eos:
            raise RuntimeError(f"model {spec.name!r} has no eos token id; generation could not stop early")
        self.eos_ids = set(eos)  # what HFGenerator stops at (hf._eos_ids), so both stop at the same tokens

        from llama_cpp import _logger

        _logger.set_verbose(bool(spec.extra.get("verbose", False)))  # llama.cpp's own log: errors only by default
        L.llama_backend_init()
        mp = model_params(L.llama_model_default_params(), bool(spec.extra.get("extra_bufts", False)))
        self._model = L.llama_model_load_from_file(str(self.gguf_path).encode(), mp)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.gguf_path}")
        self.n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model)))
        self.slots = int(spec.extra.get("slots", 16))
        if self.slots < 2:
            raise ValueError(f"model {spec.name!r}: extra.slots={self.slots}: the llama.cpp backend needs >= 2 (a context and a scratch slot)")
        self.n_batch = int(spec.extra.get("n_batch", 512))
        threads = int(spec.extra.get("n_threads") or os.cpu_count() or 1)
        cp = L.llama_context_default_params()
        cp.n_ctx = self.slots * spec.max_model_len
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = self.slots
        cp.n_threads = cp.n_threads_batch = threads
        # One KV stream per slot (n_ctx / n_seq_max = max_model_len cells each): a token attends over its own slot's
        # cells only. A prefix moves between slots as a stream copy (module docstring).
        # (A change to how the engine is driven that moves its arithmetic raises base.LLAMACPP_ENGINE_REVISION.)
        cp.kv_unified = False
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {spec.name} ({self.slots} slots x {spec.max_model_len} tokens)")
        self._lora = None
        if adapter_gguf_path is not None:
            self._lora = L.llama_adapter_lora_init(self._model, str(adapter_gguf_path).encode())
            if not self._lora:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {adapter_gguf_path}")
            arr = (L.llama_adapter_lora_p_ctypes * 1)(self._lora)
            scales = (ctypes.c_float * 1)(1.0)  # the adapter's own alpha / r is applied inside llama.cpp
            if L.llama_set_adapters_lora(self._ctx, arr, 1, scales) != 0:
                raise RuntimeError(f"llama.cpp could not apply the LoRA adapter {adapter_gguf_path}")
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.decode_seconds = 0.0  # time inside llama_decode: the engine's share of a call (src.cli.bench_judge)
        self.reused_tokens = 0  # prompt tokens served from cells already in the cache (src.cli.bench_judge)
        self._held: list[list[int]] = [[] for _ in range(self.slots)]  # the tokens each slot's cells hold, by position
        self.load_seconds = time.time() - t0
        log.info("llama.cpp loaded %s from %s%s in %.1f s (%d slots, %d threads)", spec.name, self.gguf_path,
                 f" + adapter {adapter_gguf_path}" if adapter_gguf_path else "", self.load_seconds, self.slots, threads)

    # ---------------------------------------------------------------- helpers
    def chat_text(self, prompt: Prompt) -> str:
        return self.tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)

    def _encode(self, text: str) -> list[int]:
        # the chat template already wrote the special tokens, as in HFGenerator._encode
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return [len(self._encode(self.chat_text(p))) for p in prompts]

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{self.spec.name} {desc}", unit="prompt", disable=None, leave=False)

    def _decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Decode (token, position, slot, want_logits) rows in order, n_batch per llama_decode call; the logits
        of the flagged rows, in order (copies: the engine reuses its buffer)."""
        L, b, out = self.L, self._batch, []
        for start in range(0, len(rows), self.n_batch):
            chunk = rows[start:start + self.n_batch]
            for k, (t, p, s, w) in enumerate(chunk):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = t, p, 1, 1 if w else 0
                b.seq_id[k][0] = s
            b.n_tokens = len(chunk)
            t0 = time.perf_counter()
            rc = L.llama_decode(self._ctx, b)
            self.decode_seconds += time.perf_counter() - t0
            if rc != 0:
                raise RuntimeError(f"llama.cpp decode failed for {self.spec.name} (code {rc}: "
                                   f"{'no room in the KV cache' if rc == 1 else 'error'}); {len(chunk)} tokens")
            for k, (_, _, _, w) in enumerate(chunk):
                if w:
                    ptr = L.llama_get_logits_ith(self._ctx, k)
                    out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return out

    def _fill(self, slot: int, tokens: Sequence[int], start: int, logits: str = "last") -> list[np.ndarray]:
        """Decode `tokens` into `slot` from position `start`; logits of the last token ("last") or of all."""
        n = len(tokens)
        return self._decode([(t, start + k, slot, logits == "all" or k == n - 1) for k, t in enumerate(tokens)])

    def _copy(self, src: int, dst: int, n: int | None = None) -> None:
        """Slot `dst` holds the first `n` (default: all) tokens slot `src` holds. Across KV streams llama.cpp copies
        whole streams only (the bytes move at the next decode, in call order, so chained copies are right): the
        whole stream is copied, then the cells from `n` on are dropped."""
        if n == 0:  # nothing to take over: an empty slot, no copy
            self.L.llama_memory_seq_rm(self._mem, dst, -1, -1)
            self._held[dst] = []
            return
        if src != dst:
            self.L.llama_memory_seq_rm(self._mem, dst, -1, -1)
            self.L.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            self._held[dst] = list(self._held[src])
        if n is not None and n < len(self._held[dst]):
            self.L.llama_memory_seq_rm(self._mem, dst, n, -1)
            self._held[dst] = self._held[dst][:n]

    def reset_cache(self) -> None:
        """Forget every cached prefix: where each generate / score_options call starts (and a benchmark's cold start)."""
        self.L.llama_memory_clear(self._mem, True)
        self._held = [[] for _ in range(self.slots)]

    def _load(self, slot: int, seq: Sequence[int]) -> np.ndarray:
        """Slot `slot` holding `seq`; the logits after its last token. The longest prefix of `seq` that any slot
        already holds is reused (its cells shared, not recomputed) and only the rest is decoded: the judge
        template's preamble that every prompt repeats, and a prompt whose judgment is read again by constrained
        choice (prompt + judgment + verdict prefix) after `generate` left it in a slot."""
        best, n = slot, common_prefix(self._held[slot], seq)
        for s, held in enumerate(self._held):
            k = common_prefix(held, seq)
            if k > n:
                best, n = s, k
        n = min(n, len(seq) - 1)  # the last token is decoded here: its logits are the answer
        self._copy(best, slot, n)
        self.reused_tokens += n
        logits = self._fill(slot, seq[n:], n)[0]
        self._held[slot] = list(seq)
        return logits

    # ---------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        if not prompts:
            return []
        n = sampling.n
        if n > self.slots:
            raise ValueError(f"{self.spec.name}: sampling n={n} needs {n} llama.cpp slots; set its extra.slots >= {n}")
        encoded = []
        for i, p in enumerate(prompts):
            ids = self._encode(self.chat_text(p))
            check_prompt_length(i, len(ids), self.spec.name, self.spec.max_model_len, sampling.max_new_tokens)
            encoded.append(ids)
        seeds = sampling.seeds if sampling.seeds is not None else tuple(sampling.seed + i for i in range(len(prompts)))
        self.reset_cache()  # the call's output depends on the call alone (module docstring)
        per_group = max(1, self.slots // n)
        results: list[list[Completion]] = []
        with self._progress(len(prompts), "generate") as bar:
            for g in range(0, len(prompts), per_group):
                idx = list(range(g, min(g + per_group, len(prompts))))
                results.extend(self._generate_group([encoded[i] for i in idx], [seeds[i] for i in idx], sampling))
                bar.update(len(idx))
        return results

    def _generate_group(self, seqs: list[list[int]], seeds: list[int], sampling: SamplingConfig) -> list[list[Completion]]:
        n, greedy = sampling.n, sampling.temperature <= 0
        streams = []  # [prompt index, slot, position of the next token, tokens so far, rng, finished]
        for i, (seq, seed) in enumerate(zip(seqs, seeds)):
            first_slot = i * n
            logits = self._load(first_slot, seq)
            for j in range(n):
                self._copy(first_slot, first_slot + j)
                rng = None if greedy else np.random.default_rng([int(seed), j])
                t = sample_token(logits, sampling.temperature, sampling.top_p, rng)
                streams.append([i, first_slot + j, len(seq), [t], rng, t in self.eos_ids])
        while True:
            live = [s for s in streams if not s[5] and len(s[3]) < sampling.max_new_tokens]
            if not live:
                break
            rows = self._decode([(s[3][-1], s[2] + len(s[3]) - 1, s[1], True) for s in live])
            for s, logits in zip(live, rows):
                self._held[s[1]].append(s[3][-1])
                t = sample_token(logits, sampling.temperature, sampling.top_p, s[4])
                s[3].append(t)
                s[5] = t in self.eos_ids
        out: list[list[Completion]] = [[] for _ in seqs]
        for i, _, _, toks, _, finished in streams:
            body = toks[:-1] if finished else toks
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            out[i].append(Completion(text=text, num_tokens=len(body), finished=finished))
        return out

    # ---------------------------------------------------------------- scoring
    def _continuation_logprobs(self, requests: Sequence[tuple[list[int], list[list[int]]]], desc: str) -> list[list[float]]:
        """For each (context, continuations): sum of log P(continuation tokens | context) per continuation. Each
        context is loaded into a slot (reusing any cached prefix); each continuation longer than one token is
        decoded in the scratch slot from a copy of it."""
        scores: list[list[float]] = []
        scratch = self.slots - 1  # continuations; contexts rotate over the other slots, so they stay reusable
        with self._progress(len(requests), desc) as bar:
            for i, (ctx, conts) in enumerate(requests):
                slot = i % scratch
                first = log_softmax(self._load(slot, ctx))
                row = []
                for c in conts:
                    total = float(first[c[0]])
                    if len(c) > 1:  # logits after c[k] predict c[k + 1]
                        self._copy(slot, scratch)
                        rest = self._fill(scratch, c[:-1], len(ctx), logits="all")
                        self._held[scratch].extend(c[:-1])
                        total += sum(float(log_softmax(lg)[c[k + 1]]) for k, lg in enumerate(rest))
                    row.append(total)
                scores.append(row)
                bar.update(1)
        return scores

    def choose(self, prompts: Sequence[str], prefixes: Sequence[str], options: Sequence[str]) -> list[str]:
        """The option most likely to follow chat(prompt)+prefix, planned as in HFGenerator.choose: at the options'
        first distinguishing token when there is one, else by each option's full token sequence."""
        plans = plan_choices(self.chat_text, self._encode, prompts, prefixes, options, self.spec.name, self.spec.max_model_len)
        requests = [(pl.first_context, [[t] for t in pl.first]) if pl.first is not None else (pl.context, pl.options)
                    for pl in plans]
        scores = self._continuation_logprobs(requests, "choose")
        return [options[int(np.argmax(s))] for s in scores]

    def score_options(self, prompts: Sequence[str], prefixes: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """log P(option | chat(prompt)+prefix) for every option, comparable across prompts (as HFGenerator's)."""
        requests = plan_scores(self.chat_text, self._encode, prompts, prefixes, options, self.spec.name, self.spec.max_model_len)
        self.reset_cache()  # the call's output depends on the call alone (module docstring)
        return self._continuation_logprobs(requests, "score")

    def close(self) -> None:
        L = self.L
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_lora", None):
            L.llama_adapter_lora_free(self._lora)
            self._lora = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None
