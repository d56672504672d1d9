"""`Generator` on transformers: CPU (fp32) or one GPU. Batched, left-padded, length-sorted, seeded per batch."""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Sequence

from src.models.base import Completion, ModelSpec, Prompt, SamplingConfig, chat_messages
from src.models.prompts import check_prompt_length, plan_choices, plan_scores

log = logging.getLogger(__name__)


def _torch_dtype(name: str):
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (use e.g. float32, bfloat16, float16)")
    return dt


GQA_EAGER = "ste_eager_gqa"


def _eager_gqa_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention without `repeat_kv`: the query heads of each key/value group are folded
    into the query-length axis, so K and V are read in place instead of being copied num_key_value_groups times
    per layer per step. Same maths as "eager"; on CPU, batched decoding is bound by exactly those copies."""
    import torch

    bsz, n_heads, q_len, dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    q = query.reshape(bsz, n_kv, groups * q_len, dim)
    w = torch.matmul(q, key.transpose(2, 3)) * scaling  # [b, kv, g*q, L]
    if attention_mask is not None:
        m = attention_mask[..., :kv_len]
        if m.shape[1] == 1:
            m = m.unsqueeze(2)  # [b, 1, 1, q, L]
        else:
            m = m.reshape(bsz, n_kv, groups, q_len, kv_len)
        w = (w.view(bsz, n_kv, groups, q_len, kv_len) + m).view(bsz, n_kv, groups * q_len, kv_len)
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).view(bsz, n_heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), w.view(bsz, n_heads, q_len, kv_len)


def _register_gqa_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(GQA_EAGER, _eager_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_EAGER, eager_mask)


def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer that writes new keys/values into a buffer sized for the whole generation, instead of
        `torch.cat`-ing the full cache every step (on CPU that copy was half of a batched decode step).
        `keys`/`values` are views of the buffer; if something replaces them (crop, reorder), it re-seeds."""

        def __init__(self, keys, values, capacity: int):
            super().__init__()
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._seed(keys, values, capacity)

        def _seed(self, keys, values, capacity: int) -> None:
            b, h, n, d = keys.shape
            self._kbuf = keys.new_empty((b, h, max(capacity, n), d))
            self._vbuf = values.new_empty((b, values.shape[1], max(capacity, n), values.shape[-1]))
            self._kbuf[:, :, :n] = keys
            self._vbuf[:, :, :n] = values
            self._len = n
            self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            n_new = key_states.shape[-2]
            same_buffer = (self.keys.data_ptr() == self._kbuf.data_ptr() and self.keys.shape[0] == self._kbuf.shape[0]
                           and self.keys.shape[-2] <= self._len)
            if same_buffer:
                self._len = self.keys.shape[-2]  # after a crop
            if not same_buffer or self._len + n_new > self._kbuf.shape[-2]:
                self._seed(self.keys, self.values, 2 * (self.keys.shape[-2] + n_new))
            end = self._len + n_new
            self._kbuf[:, :, self._len:end] = key_states
            self._vbuf[:, :, self._len:end] = value_states
            self._len = end
            self.keys, self.values = self._kbuf[:, :, :end], self._vbuf[:, :, :end]
            return self.keys, self.values

    return PreallocatedLayer


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise RuntimeError("model has no eos token id; generation could not stop early")
    return ids


class HFGenerator:
    """Implements `base.Generator` with transformers `generate`.

    `spec.batch_size` prompts go through each `generate` call, `sampling.n` rows each, so batch_size*n rows decode
    together. Prompts are sorted by token length (longest batch first); results come back in input order.
    `torch.manual_seed(sampling.seed + batch_index)` before each batch makes a call's output a function of
    (prompts, sampling, batch_size). Sampling is exactly temperature + top_p: the model's own generation_config
    extras (top_k, repetition_penalty) are switched off, as in the vLLM backend.

    CPU speed-ups, all exact (tests compare them with the plain path):
      * shared prefill: each prompt is prefilled once, unpadded, and its KV cache is copied to its n rows;
      * "eager" attention is replaced by a grouped-query variant that does not copy K/V per query head;
      * the KV cache is preallocated for the whole generation instead of being concatenated every step.
    spec.extra: {"shared_prefill": False} or {"gqa_eager": False} switch the first two off; {"device": "cuda"}."""

    def __init__(self, spec: ModelSpec, model_dir: str | Path, adapter: str | Path | None = None, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.model_dir = model_dir
        self.adapter = adapter
        self.device = device or spec.extra.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.time()
        # model_dir is local (loading.resolve_model_dir downloads hub ids at spec.revision first)
        tok = AutoTokenizer.from_pretrained(model_dir)
        if spec.chat_template:
            tok.chat_template = spec.chat_template
        if not tok.chat_template:
            raise ValueError(f"model {spec.name!r} has no chat template; set chat_template in its model config")
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        kwargs = {"dtype": _torch_dtype(spec.dtype)}
        attn = spec.attn_implementation
        if attn == "eager" and spec.extra.get("gqa_eager", True):
            _register_gqa_eager()
            attn = GQA_EAGER
        if attn:
            kwargs["attn_implementation"] = attn
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        if adapter is not None:
            from peft import PeftModel

            # merged: inference then runs at the base model's speed
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.to(self.device)
        model.eval()
        self.model = model
        self.eos_ids = _eos_ids(model, tok)
        self.shared_prefill = bool(spec.extra.get("shared_prefill", True))
        self.load_seconds = time.time() - t0
        log.info("loaded %s from %s%s in %.1f s", spec.name, model_dir, f" + adapter {adapter}" if adapter else "", self.load_seconds)

    # ---------------------------------------------------------------- helpers
    def chat_text(self, prompt: Prompt) -> str:
        return self.tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return [len(self._encode(self.chat_text(p))) for p in prompts]

    def _encode(self, text: str) -> list[int]:
        # the chat template already wrote the special tokens (BOS included, for templates that have one)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _left_pad(self, seqs: list[list[int]]):
        import torch

        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{self.spec.name} {desc}", unit="prompt", disable=None, leave=False)

    # ---------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        import torch

        if sampling.n < 1:
            raise ValueError("sampling.n must be >= 1")
        if not prompts:
            return []
        if sampling.seeds is not None:
            # Batch-invariant by construction: a padded batch's arithmetic (and its one RNG stream) depends on
            # its neighbours, so each prompt decodes alone (its n samples still together).
            import dataclasses

            return [self.generate([p], dataclasses.replace(sampling, seed=s, seeds=None))[0] for p, s in zip(prompts, sampling.seeds)]
        do_sample = sampling.temperature > 0
        encoded = []
        for i, p in enumerate(prompts):
            ids = self._encode(self.chat_text(p))
            check_prompt_length(i, len(ids), self.spec.name, self.spec.max_model_len, sampling.max_new_tokens)
            encoded.append(ids)
        # longest first: the first batch shows the peak memory, and similar lengths share a batch
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        results: list[list[Completion] | None] = [None] * len(prompts)
        bs = max(1, self.spec.batch_size)
        gen_kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            do_sample=do_sample,
            repetition_penalty=1.0,
        )
        if do_sample:
            # top_k=0: nucleus sampling only (transformers otherwise adds its default top_k=50; vLLM has none)
            gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        eos = set(self.eos_ids)
        with self._progress(len(prompts), "generate") as bar, torch.inference_mode():
            for b, start in enumerate(range(0, len(order), bs)):
                idx = order[start:start + bs]
                input_ids, mask = self._left_pad([encoded[i] for i in idx])
                cache = (self._prefill([encoded[i] for i in idx], sampling.n, sampling.max_new_tokens)
                         if self.shared_prefill else None)
                torch.manual_seed(sampling.seed + b)
                if cache is None:
                    out = self.model.generate(input_ids=input_ids, attention_mask=mask, **gen_kwargs)
                else:
                    n = sampling.n
                    out = self.model.generate(
                        input_ids=input_ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                        past_key_values=cache, **{**gen_kwargs, "num_return_sequences": 1},
                    )
                new = out[:, input_ids.shape[1]:].tolist()
                for row, toks in enumerate(new):
                    stop = next((k for k, t in enumerate(toks) if t in eos), None)
                    body = toks if stop is None else toks[:stop]
                    text = self.tokenizer.decode(body, skip_special_tokens=True)
                    comp = Completion(text=text, num_tokens=len(body), finished=stop is not None)
                    i = idx[row // sampling.n]
                    if results[i] is None:
                        results[i] = []
                    results[i].append(comp)
                bar.update(len(idx))
        return results  # type: ignore[return-value]

    def _prefill(self, seqs: list[list[int]], n: int, max_new_tokens: int):
        """KV cache of every prompt but its last token, computed once per prompt (unpadded, batch 1), then
        left-padded into one batch and repeated n times (rows i*n..i*n+n-1 belong to prompt i, as with
        num_return_sequences). Saves the padding and the (n-1) repeated prefills that plain
        `generate(num_return_sequences=n)` spends; on 2 CPU cores prefill dominates judge prompts. Returns None
        (use plain generate) for caches that are not plain full-attention layers (e.g. sliding windows)."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if min(len(s) for s in seqs) < 2:
            return None
        width = max(len(s) for s in seqs) - 1
        per_prompt = []
        for s in seqs:
            ids = torch.tensor([s[:-1]], dtype=torch.long, device=self.device)
            cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
                self.shared_prefill = False
                log.info("%s: cache type %s not supported by shared prefill; using plain generate", self.spec.name, type(cache).__name__)
                return None
            per_prompt.append([(layer.keys, layer.values) for layer in cache.layers])
        layer_cls = _preallocated_layer_class()
        layers = []
        for li in range(len(per_prompt[0])):
            ks, vs = [], []
            for kv in per_prompt:
                k, v = kv[li]
                pad = width - k.shape[-2]
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            keys, values = torch.cat(ks).repeat_interleave(n, 0), torch.cat(vs).repeat_interleave(n, 0)
            layers.append(layer_cls(keys, values, capacity=width + max_new_tokens + 1))
        cache = DynamicCache()
        cache.layers = layers
        return cache

    # ---------------------------------------------------------------- choose
    def choose(self, prompts: Sequence[str], prefixes: Sequence[str], options: Sequence[str]) -> list[str]:
        """For each prompt, the option most likely to follow chat(prompt)+prefix.

        Options are compared at their first distinguishing token: one forward pass per prompt over
        context + (the token prefix all options share), reading the log-probs at the last position. That is
        the plain first-token comparison when the options' first tokens differ, and handles "[[A]]" vs "[[B]]"
        (which share "[[") with no extra pass. When that is ambiguous (an option's tokens are a prefix of
        another's, or options still collide after the shared prefix), the full option sequences are scored
        (sum of log-probs), one extra row per option."""
        import torch

        plans = plan_choices(self.chat_text, self._encode, prompts, prefixes, options, self.spec.name, self.spec.max_model_len)
        chosen: list[str | None] = [None] * len(prompts)
        bs = max(1, self.spec.batch_size)
        first = sorted((i for i, pl in enumerate(plans) if pl.first is not None), key=lambda i: -len(plans[i].first_context))
        with self._progress(len(prompts), "choose") as bar, torch.inference_mode():
            for start in range(0, len(first), bs):
                idx = first[start:start + bs]
                logp = self._last_logprobs([plans[i].first_context for i in idx], keep=1)[:, -1, :]
                for row, i in enumerate(idx):
                    scores = logp[row, plans[i].first]
                    chosen[i] = options[int(torch.argmax(scores))]
                bar.update(len(idx))
            # full-sequence scoring: one row per (prompt, option)
            rows = [(i, j) for i, pl in enumerate(plans) if pl.first is None for j in range(len(options))]
            rows.sort(key=lambda r: -(len(plans[r[0]].context) + len(plans[r[0]].options[r[1]])))
            totals: dict[tuple[int, int], float] = {}
            for start in range(0, len(rows), bs):
                chunk = rows[start:start + bs]
                seqs = [plans[i].full_rows()[j] for i, j in chunk]
                m = max(len(plans[i].options[j]) for i, j in chunk)
                logp = self._last_logprobs(seqs, keep=m + 1)  # [B, m+1, V]; position t predicts token t+1
                for row, (i, j) in enumerate(chunk):
                    opt = plans[i].options[j]
                    L = len(opt)
                    # option tokens are the last L of the row; their predictions sit at positions -L-1 .. -2
                    pred = logp[row, m - L: m, :]
                    totals[(i, j)] = float(pred.gather(1, torch.tensor(opt, device=pred.device)[:, None]).sum())
            for i, pl in enumerate(plans):
                if pl.first is None:
                    best = max(range(len(options)), key=lambda j: totals[(i, j)])
                    chosen[i] = options[best]
                    bar.update(1)
        return chosen  # type: ignore[return-value]

    def score_options(self, prompts: Sequence[str], prefixes: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """For each prompt, log P(option | chat(prompt)+prefix) for every option: the sum of the option tokens'
        log-probs. One batched forward over the contexts; the continuations of options longer than one token
        ("roleplay" -> " role" "play") go through a second batched forward, one row per (prompt, long option).
        Unlike `choose`, the scores are comparable across prompts (classification calibrates on them)."""
        import torch

        plans = plan_scores(self.chat_text, self._encode, prompts, prefixes, options, self.spec.name, self.spec.max_model_len)
        shared = self._score_after_shared_prefix(plans, len(options)) if self.shared_prefill else None
        if shared is not None:
            return shared
        scores = [[0.0] * len(options) for _ in prompts]
        bs = max(1, self.spec.batch_size)
        with self._progress(len(prompts), "score") as bar, torch.inference_mode():
            order = sorted(range(len(prompts)), key=lambda i: -len(plans[i][0]))
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                logp = self._last_logprobs([plans[i][0] for i in idx], keep=1)[:, -1, :]
                for row, i in enumerate(idx):
                    for j, o in enumerate(plans[i][1]):
                        scores[i][j] = float(logp[row, o[0]])
                bar.update(len(idx))
            # the rest of multi-token options: context + option, log-probs of tokens 2..L
            rows = [(i, j) for i, (_, opts) in enumerate(plans) for j, o in enumerate(opts) if len(o) > 1]
            rows.sort(key=lambda r: -(len(plans[r[0]][0]) + len(plans[r[0]][1][r[1]])))
            for start in range(0, len(rows), bs):
                chunk = rows[start:start + bs]
                m = max(len(plans[i][1][j]) for i, j in chunk) - 1
                logp = self._last_logprobs([plans[i][0] + plans[i][1][j] for i, j in chunk], keep=m + 1)
                for row, (i, j) in enumerate(chunk):
                    rest = plans[i][1][j][1:]
                    L = len(rest)
                    # the last L tokens of the row are `rest`; their predictions sit at positions -L-1 .. -2
                    pred = logp[row, m - L: m, :]
                    scores[i][j] += float(pred.gather(1, torch.tensor(rest, device=pred.device)[:, None]).sum())
        return scores

    def _score_after_shared_prefix(self, plans: list[tuple[list[int], list[list[int]]]], n_options: int) -> list[list[float]] | None:
        """score_options when the contexts share a long token prefix (a classify prompt: chat template, label
        descriptions and examples before the instruction): that prefix is computed once and its KV cache reused,
        so each prompt costs only its own tokens (batch 1, unpadded), then each multi-token option's rest.
        Same maths as the batched path (tests compare them). None when there is no prefix worth sharing."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        ctxs = [c for c, _ in plans]
        n = min(len(c) for c in ctxs) - 1  # every prompt keeps at least one token of its own
        for c in ctxs[1:]:
            n = next((i for i in range(n) if c[i] != ctxs[0][i]), n)
        if len(plans) < 2 or n < 32:
            return None
        with torch.inference_mode():
            cache = self.model(input_ids=torch.tensor([ctxs[0][:n]], device=self.device), use_cache=True, logits_to_keep=1).past_key_values
            if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
                return None
            prefix = [(layer.keys, layer.values) for layer in cache.layers]
            scores = [[0.0] * n_options for _ in plans]
            with self._progress(len(plans), "score") as bar:
                for i, (ctx, opts) in enumerate(plans):
                    cache = DynamicCache(ddp_cache_data=prefix)  # copies: the prefix tensors stay as they are
                    out = self.model(input_ids=torch.tensor([ctx[n:]], device=self.device), past_key_values=cache,
                                     use_cache=True, logits_to_keep=1)
                    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                    after_ctx = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
                    for j, o in enumerate(opts):
                        scores[i][j] = float(first[o[0]])
                        if len(o) > 1:  # tokens 2..L of the option, after context + its first token(s)
                            rest = self.model(input_ids=torch.tensor([o[:-1]], device=self.device),
                                              past_key_values=DynamicCache(ddp_cache_data=after_ctx), use_cache=True,
                                              logits_to_keep=len(o) - 1)
                            logp = torch.log_softmax(rest.logits[0, -(len(o) - 1):].float(), dim=-1)
                            scores[i][j] += float(logp.gather(1, torch.tensor(o[1:], device=self.device)[:, None]).sum())
                    bar.update(1)
        return scores

    def _last_logprobs(self, seqs: list[list[int]], keep: int):
        import torch

        ids, mask = self._left_pad(seqs)
        # explicit positions: with left padding, row positions must start at 0 at the first real token
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
        return torch.log_softmax(out.logits[:, -keep:, :].float(), dim=-1)

    def close(self) -> None:
        import torch

        if getattr(self, "model", None) is not None:
            del self.model
            self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
