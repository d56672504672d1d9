"""`Generator` on vLLM, for GPU runs (the paper-scale models). Same contract as `hf.HFGenerator`.

vllm is imported lazily: it is a GPU-only extra (`pip install -e .[gpu]`) and must not be installed on the CPU
machines. `loading.preflight` refuses a vllm spec there before anything gets this far.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from src.models.base import Completion, ModelSpec, SamplingConfig, chat_messages
from src.models.prompts import check_prompt_length, plan_choices, plan_scores

log = logging.getLogger(__name__)

_TOP_LOGPROBS = 20  # vLLM's default max_logprobs


# The ranks vLLM accepts for max_lora_rank (vllm/config/lora.py MaxLoRARanks, the same in 0.31 and 0.32).
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(adapter: str | Path) -> int:
    """The smallest max_lora_rank that holds the adapter's rank (peft's adapter_config.json `r`). vLLM pads every
    adapter to max_lora_rank, so a larger slot only costs memory and (on the CPU build, noticeably) time."""
    import json

    r = int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])
    fits = [k for k in _LORA_RANKS if k >= r]
    if not fits:
        raise ValueError(f"{adapter}: LoRA rank {r} is over vLLM's largest max_lora_rank {_LORA_RANKS[-1]}")
    return fits[0]


class VLLMGenerator:
    def __init__(self, spec: ModelSpec, model_dir: str | Path, adapter: str | Path | None = None):
        from vllm import LLM  # noqa: PLC0415 - GPU-only dependency

        self.spec = spec
        self.model_dir = model_dir
        t0 = time.time()
        kwargs = dict(
            model=str(model_dir),
            tensor_parallel_size=spec.tensor_parallel_size,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            max_model_len=spec.max_model_len,
            dtype=spec.dtype,  # as the HF backend: the same weights in the same precision
            enable_lora=adapter is not None,
            seed=0,
        )
        if adapter is not None:
            kwargs["max_lora_rank"] = int(spec.extra.get("max_lora_rank") or lora_rank_slot(adapter))
        kwargs.update(spec.extra.get("vllm_kwargs", {}))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        if spec.chat_template:
            self.tokenizer.chat_template = spec.chat_template
        self.lora_request = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, str(adapter))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if eos is not None else set()
        try:  # vLLM also stops at the generation config's eos ids
            from transformers import GenerationConfig

            g = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
            self.eos_ids |= {g} if isinstance(g, int) else set(g or [])
        except Exception:  # noqa: BLE001 - no generation_config.json
            pass
        self.load_seconds = time.time() - t0
        log.info("vLLM loaded %s in %.1f s", spec.name, self.load_seconds)

    def chat_text(self, prompt) -> str:
        """The chat-templated text of a prompt (a user message, or system + user messages)."""
        return self.tokenizer.apply_chat_template(
            chat_messages(prompt), add_generation_prompt=True, tokenize=False
        )

    def _encode(self, text: str) -> list[int]:
        # the chat template already wrote the special tokens, as in HFGenerator._encode
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count_tokens(self, prompts: Sequence) -> list[int]:
        return [len(self._encode(self.chat_text(p))) for p in prompts]

    def _run(self, token_lists: list[list[int]], params):
        prompts = [{"prompt_token_ids": ids} for ids in token_lists]
        return self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=True)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        if not prompts:
            return []
        ids = []
        for i, p in enumerate(prompts):
            x = self._encode(self.chat_text(p))
            check_prompt_length(i, len(x), self.spec.name, self.spec.max_model_len, sampling.max_new_tokens)
            ids.append(x)
        greedy = sampling.temperature <= 0
        # one SamplingParams per prompt: a per-request seed makes each prompt's samples independent of batching
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=None if greedy else (sampling.seeds[i] if sampling.seeds is not None else sampling.seed + i),
            )
            for i in range(len(prompts))
        ]
        outs = self._run(ids, params)
        results = []
        for out in outs:
            comps = []
            for o in out.outputs:
                toks = list(o.token_ids)
                finished = o.finish_reason != "length"
                n_tok = len(toks) - (1 if finished and toks and toks[-1] in self.eos_ids else 0)
                comps.append(Completion(text=o.text, num_tokens=n_tok, finished=finished))
            results.append(comps)
        return results

    def choose(self, prompts: Sequence[str], prefixes: Sequence[str], options: Sequence[str]) -> list[str]:
        """First-distinguishing-token comparison from the top-20 log-probs of a 1-token generation (the
        options' shared token prefix is appended to the context first, as in HFGenerator.choose). Prompts where
        that is ambiguous, or where no option's token is in the top 20, are scored on the full option
        sequences with prompt_logprobs."""
        from vllm import SamplingParams

        plans = plan_choices(self.chat_text, self._encode, prompts, prefixes, options, self.spec.name, self.spec.max_model_len)
        chosen: list[str | None] = [None] * len(prompts)
        first_idx = [i for i, pl in enumerate(plans) if pl.first is not None]
        if first_idx:
            params = SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=_TOP_LOGPROBS)
            outs = self._run([plans[i].first_context for i in first_idx], params)
            for i, out in zip(first_idx, outs):
                top = out.outputs[0].logprobs[0]  # dict token_id -> Logprob
                scores = [top[t].logprob if t in top else float("-inf") for t in plans[i].first]
                if max(scores) > float("-inf"):
                    chosen[i] = options[max(range(len(options)), key=lambda j: scores[j])]
        full_idx = [i for i in range(len(prompts)) if chosen[i] is None]
        if full_idx:
            params = SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=0)
            rows = [(i, j) for i in full_idx for j in range(len(options))]
            outs = self._run([plans[i].full_rows()[j] for i, j in rows], params)
            totals: dict[tuple[int, int], float] = {}
            for (i, j), out in zip(rows, outs):
                opt = plans[i].options[j]
                lps = out.prompt_logprobs[-len(opt):]  # one dict per prompt token (first entry is None)
                totals[(i, j)] = sum(d[t].logprob for d, t in zip(lps, opt))
            for i in full_idx:
                chosen[i] = options[max(range(len(options)), key=lambda j: totals[(i, j)])]
        return chosen  # type: ignore[return-value]

    def score_options(self, prompts: Sequence[str], prefixes: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """log P(option | chat(prompt)+prefix) per option from prompt_logprobs: one row per (prompt, option), the
        plan (and length check) shared with the other backends (prompts.plan_scores). Every row prefills its whole
        context: vLLM 0.31 skips the prefix cache for a request with prompt_logprobs (SamplingParams sets
        skip_reading_prefix_cache, since cached tokens would get no log-probs), so a prompt with k options costs k
        prefills, not one (estimate.classify_work counts them so)."""
        from vllm import SamplingParams

        plans = plan_scores(self.chat_text, self._encode, prompts, prefixes, options, self.spec.name, self.spec.max_model_len)
        rows = [(i, j) for i in range(len(prompts)) for j in range(len(options))]
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = self._run([plans[i][0] + plans[i][1][j] for i, j in rows], params)
        scores = [[0.0] * len(options) for _ in prompts]
        for (i, j), out in zip(rows, outs):
            opt = plans[i][1][j]
            lps = out.prompt_logprobs[-len(opt):]  # one dict per prompt token; the sampled token is always in it
            scores[i][j] = sum(d[t].logprob for d, t in zip(lps, opt))
        return scores

    def close(self) -> None:
        """Shut the engine down now, not at garbage collection: vLLM 0.31's LLM has no shutdown of its own, its
        engine core client's (what vLLM's own tests call) ends the engine core process(es), whose exit frees their
        GPU memory. The pool then waits until the GPUs show it free (gpu_memory.wait_until_gpus_free)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            # in-process state (an engine run with VLLM_ENABLE_V1_MULTIPROCESSING=0): process groups, gc, empty_cache
            cleanup_dist_env_and_memory()
