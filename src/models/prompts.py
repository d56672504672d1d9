"""What both backends (hf.py, vllm_backend.py) do the same way before any model runs: the prompt-length check
and the plan of a constrained choice. Pure functions over a tokenizer's `encode`; no torch, no vllm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

Encode = Callable[[str], list[int]]


def check_prompt_length(i: int, n_tokens: int, model: str, max_model_len: int, max_new_tokens: int) -> None:
    """vLLM rejects a request whose prompt + max_tokens exceed max_model_len; the HF backend applies the same
    rule so the two agree on which prompts run. Render-time clipping keeps real prompts under it."""
    limit = max_model_len - max_new_tokens
    if n_tokens > limit:
        raise ValueError(
            f"prompt {i} is {n_tokens} tokens with the chat template; {model} allows "
            f"max_model_len {max_model_len} - max_new_tokens {max_new_tokens} = {limit}"
        )


def move_trailing_spaces(context: str, options: Sequence[str]) -> tuple[str, list[str]]:
    """'Category: ' + 'coding' -> 'Category:' + ' coding': BPE vocabularies carry the space on the next word, so
    a context ending in spaces would otherwise leave a lone space token the model rarely produces."""
    stripped = context.rstrip(" ")
    ws = context[len(stripped):]
    return stripped, [ws + o for o in options]


def option_ids(encode: Encode, context: str, context_ids: list[int], option: str) -> list[int]:
    """Tokens of `option` as they continue `context` (BPE merges across the boundary are possible; then fall
    back to the option tokenized on its own)."""
    full = encode(context + option)
    if full[: len(context_ids)] == context_ids and len(full) > len(context_ids):
        return full[len(context_ids):]
    ids = encode(option)
    if not ids:
        raise ValueError(f"option {option!r} tokenizes to nothing")
    return ids


@dataclass
class ChoicePlan:
    """How one prompt's options are compared. `first` is set when the options differ at one token position
    after a shared token prefix: then one next-token distribution over `context + shared` decides (the options'
    tokens there are `first`). Otherwise (an option is a prefix of another, or they collide) each option's full
    token sequence is scored after `context`."""

    context: list[int]  # chat(prompt) + prefix, trailing spaces moved onto the options
    options: list[list[int]]  # each option's tokens as they continue `context`
    shared: list[int]  # the token prefix all options share
    first: list[int] | None  # the distinguishing token of each option, or None (score full sequences)

    @property
    def first_context(self) -> list[int]:
        return self.context + self.shared

    def full_rows(self) -> list[list[int]]:
        return [self.context + o for o in self.options]


def plan_choices(chat_text: Callable[[str], str], encode: Encode, prompts: Sequence[str], prefixes: Sequence[str],
                 options: Sequence[str], model: str, max_model_len: int) -> list[ChoicePlan]:
    if len(prompts) != len(prefixes):
        raise ValueError("prompts and prefixes must have the same length")
    if len(set(options)) != len(options) or len(options) < 2:
        raise ValueError(f"need at least two distinct options, got {list(options)}")
    plans = []
    for i, (p, pre) in enumerate(zip(prompts, prefixes)):
        text, opt_texts = move_trailing_spaces(chat_text(p) + pre, options)
        ctx = encode(text)
        opts = [option_ids(encode, text, ctx, o) for o in opt_texts]
        k = 0
        while all(len(o) > k for o in opts) and len({o[k] for o in opts}) == 1:
            k += 1
        firsts = [o[k] if len(o) > k else None for o in opts]
        ok = None not in firsts and len(set(firsts)) == len(firsts)
        plan = ChoicePlan(ctx, opts, opts[0][:k], firsts if ok else None)  # type: ignore[arg-type]
        longest = max(len(o) for o in opts)
        if len(ctx) + longest > max_model_len:
            raise ValueError(f"{model}: choose prompt {i} is {len(ctx)} tokens + option {longest}, over max_model_len {max_model_len}")
        plans.append(plan)
    return plans


def plan_scores(chat_text: Callable[[str], str], encode: Encode, prompts: Sequence[str], prefixes: Sequence[str],
                options: Sequence[str], model: str, max_model_len: int) -> list[tuple[list[int], list[list[int]]]]:
    """What score_options scores, for each prompt: (context tokens, each option's tokens as they continue it)."""
    if len(prompts) != len(prefixes):
        raise ValueError("prompts and prefixes must have the same length")
    if len(set(options)) != len(options) or not options:
        raise ValueError(f"need distinct options, got {list(options)}")
    plans = []
    for i, (p, pre) in enumerate(zip(prompts, prefixes)):
        ctx_text, opt_texts = move_trailing_spaces(chat_text(p) + pre, options)
        ctx = encode(ctx_text)
        opts = [option_ids(encode, ctx_text, ctx, o) for o in opt_texts]
        if len(ctx) + max(len(o) for o in opts) > max_model_len:
            raise ValueError(f"score_options prompt {i} is {len(ctx)} tokens, over max_model_len {max_model_len}")
        plans.append((ctx, opts))
    return plans
