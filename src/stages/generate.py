"""Stage 2, generate: build a synthetic preference pair for each selected instruction x.

chosen = the model's answer to x. rejected = its answer to a modified instruction x' ("highly relevant but
not semantically identical"), so the label is known without a human. Reads the `negatives` config group.
Outputs that fail to parse (no x', x' equal to x, an empty answer) are counted and dropped, each reason under
its own stat (`dropped/<reason>`, logged as `generate/dropped/<reason>`). Answers cut off at the token limit are
counted per role (`truncated/chosen`, `truncated/rejected`); `drop_truncated` drops those pairs.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

from src.cache import Partial, make_key, run_chunked
from src.config import ConfigError, as_dict
from src.models.base import Completion, Generator, ModelSpec, SamplingConfig, fits, model_id
from src.prompts import load_template, text_fingerprint
from src.records import Instruction, Pair, from_dict, to_dict
from src.judging import item_seed
from src.step import Context, Stage, Step, as_rows, prefixed, records

log = logging.getLogger(__name__)
VERSION = 2  # 2: format_break drop reason, truncation counts, drop_truncated


@dataclass
class NegativesConfig:
    method: str = "modified_instruction"
    mode: str = "two_step"
    modify_prompt: str | None = None
    single_call_prompt: str | None = None
    rewrite_prompt: str | None = None
    answer_max_new_tokens: int = 64
    modify_max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float = 1.0
    # Drop a pair whose chosen or rejected answer hit the token limit. A cut-off chosen answer can be worse than the
    # rejected one, so the known label may be wrong; but on CPU (64 tokens) most answers are cut: off by default.
    drop_truncated: bool = False

    def validate(self, where: str) -> None:
        if self.method not in ("modified_instruction", "worse_rewrite"):
            raise ConfigError(f"{where}.method={self.method!r}: known methods: modified_instruction, worse_rewrite")
        if self.mode not in ("two_step", "single_call"):
            raise ConfigError(f"{where}.mode={self.mode!r}: use two_step or single_call")


def templates(cfg: NegativesConfig):
    if cfg.method == "worse_rewrite":
        return {"rewrite": load_template(cfg.rewrite_prompt, "worse_rewrite.txt", ("input", "generation"), "negatives.rewrite_prompt")}
    if cfg.mode == "two_step":
        return {"modify": load_template(cfg.modify_prompt, "modify_instruction.txt", ("input",), "negatives.modify_prompt")}
    return {
        "single_call": load_template(
            cfg.single_call_prompt, "worse_response.txt", ("input", "generation"), "negatives.single_call_prompt"
        )
    }


def key(cfg: NegativesConfig, select_key: str, seed: ModelSpec, random_seed: int, chunk_size: int) -> str:
    """generate's key: `negatives`, the instructions, the seed model, the prompts' text and the chunk size (a chunk
    bounds its batches; padded batched arithmetic is not bit-invariant). Sampled pairs were seeded per chunk before
    they were seeded per instruction: `seeding` keeps those outputs apart (greedy ones, unchanged, keep their keys)."""
    return make_key(
        "generate", VERSION, as_dict(cfg), {"select": select_key}, model=model_id(seed, None), random_seed=random_seed,
        chunk_size=chunk_size, prompts={k: text_fingerprint(t) for k, t in templates(cfg).items()},
        **({"seeding": "per_instruction"} if cfg.temperature > 0 else {}),
    )


# Every reason a pair can be dropped for, so each is logged (as 0 too) and runs compare metric by metric.
# format_break: the output has no parsable x' (single_call: the worse_response markers are missing or x' is empty;
# two_step: the x' call wrote nothing usable).
# too_long: a prompt of the pair (the instruction, x', or the single-call/rewrite prompt with the chosen answer) does
# not fit the seed's max_model_len with its max_new_tokens (base.fits).
DROP_REASONS = ("too_long", "empty_chosen", "format_break", "modified_equals_original", "empty_rejected", "rejected_equals_chosen",
                "truncated")


_LABEL = re.compile(r"^\s*(\*\*)?(modified (instruction|question|user question)|new instruction)\s*:?\s*(\*\*)?\s*:?\s*", re.I)


def clean_modified(text: str) -> str:
    """The modified instruction as the model wrote it, minus the labels and quotes small models add."""
    text = text.strip()
    text = re.sub(r"^\[User Question Modified\]\s*", "", text, flags=re.I)
    text = _LABEL.sub("", text)
    text = re.sub(r"\[End of (User )?Question\].*$", "", text, flags=re.I | re.S).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


_SINGLE = re.compile(
    r"\[User Question Modified\]\s*(?P<mod>.*?)\s*\[The start of Assistant's answer to the modified instruction\]\s*"
    r"(?P<ans>.*?)\s*(\[The end of Assistant's answer to the modified instruction\]|$)",
    re.S | re.I,
)


def parse_single_call(text: str) -> tuple[str, str, bool] | None:
    """(x', answer, end marker present) from the paper's worse_response format, or None when the markers are missing."""
    m = _SINGLE.search(text)
    if not m:
        return None
    return m.group("mod").strip(), m.group("ans").strip(), bool(m.group(3))


def _same(a: str, b: str) -> bool:
    return re.sub(r"\W+", " ", a).strip().lower() == re.sub(r"\W+", " ", b).strip().lower()


def _seeds(cfg: NegativesConfig, chunk: list[Instruction], seed: int, call: str) -> tuple[int, ...] | None:
    """One seed per instruction and call when sampling, so a pair does not depend on the chunk it was generated in
    (chunks are 16 prompts on the HF backend, 1,024 on vLLM). Greedy needs none (and the HF backend decodes seeded
    prompts one by one)."""
    return tuple(item_seed(seed, i.id, call) for i in chunk) if cfg.temperature > 0 else None


def _generate_fitting(model: Generator, prompts: list, sampling: SamplingConfig) -> list[Completion | None]:
    """One completion per prompt, None for a prompt that cannot fit the model's context with the call's
    max_new_tokens (base.fits): its pair is dropped as `too_long`, since an instruction is the task and cutting it
    would change what the answers answer. The others run in one call, each with its own seed, so a dropped prompt
    does not change its neighbours' samples."""
    ok = [k for k, f in enumerate(fits(model, prompts, sampling.max_new_tokens)) if f]
    if len(ok) < len(prompts):
        log.warning("generate: %d of %d prompts do not fit %s's max_model_len %d with %d new tokens: dropped as too_long",
                    len(prompts) - len(ok), len(prompts), model.spec.name, model.spec.max_model_len, sampling.max_new_tokens)
        seeds = sampling.seeds
        if seeds is None and sampling.temperature > 0:
            seeds = tuple(sampling.seed + k for k in range(len(prompts)))  # the backends' own positional seeds
        sampling = dataclasses.replace(sampling, seeds=None if seeds is None else tuple(seeds[k] for k in ok))
    out: list[Completion | None] = [None] * len(prompts)
    for k, c in zip(ok, model.generate([prompts[k] for k in ok], sampling) if ok else []):
        out[k] = c[0]
    return out


def _pairs_for_chunk(cfg: NegativesConfig, chunk: list[Instruction], model: Generator, seed: int) -> list[dict]:
    """Rows for the partial file: {"id", "pair": {...}} or {"id", "drop": reason}."""
    answer = SamplingConfig(cfg.answer_max_new_tokens, cfg.temperature, cfg.top_p, 1, seed, _seeds(cfg, chunk, seed, "answer"))
    answered = _generate_fitting(model, [i.text for i in chunk], answer)
    too_long = {k for k, c in enumerate(answered) if c is None}
    chosen = [c if c is not None else Completion(text="", num_tokens=0, finished=True) for c in answered]
    ans = [k for k in range(len(chunk)) if k not in too_long]  # instructions with a chosen answer
    rows: list[dict] = []
    tpl = templates(cfg)
    mods = ["" for _ in chunk]
    rejected: dict[int, Completion] = {}

    def run_on(ks: list[int], prompts: list, sampling: SamplingConfig) -> dict[int, Completion]:
        outs = _generate_fitting(model, prompts, sampling)
        too_long.update(k for k, o in zip(ks, outs) if o is None)
        return {k: o for k, o in zip(ks, outs) if o is not None}

    if cfg.method == "worse_rewrite":
        # No x': the rejected response is a worse rewrite of the chosen answer to x itself.
        rewrite = dataclasses.replace(answer, seeds=_seeds(cfg, [chunk[k] for k in ans], seed, "rewrite"))
        rejected = run_on(ans, [tpl["rewrite"].render(input=chunk[k].text, generation=chosen[k].text) for k in ans], rewrite)
    elif cfg.mode == "two_step":
        modify = SamplingConfig(cfg.modify_max_new_tokens, cfg.temperature, cfg.top_p, 1, seed + 1, _seeds(cfg, [chunk[k] for k in ans], seed, "modify"))
        for k, c in run_on(ans, [tpl["modify"].render(input=chunk[k].text) for k in ans], modify).items():
            mods[k] = clean_modified(c.text)
        ok = [k for k in ans if mods[k] and not _same(mods[k], chunk[k].text)]
        seeds = _seeds(cfg, [chunk[k] for k in ok], seed, "rejected")
        rejected = run_on(ok, [mods[k] for k in ok], dataclasses.replace(answer, seeds=seeds)) if ok else {}
    else:
        long = SamplingConfig(cfg.modify_max_new_tokens + cfg.answer_max_new_tokens, cfg.temperature, cfg.top_p, 1, seed + 1,
                              _seeds(cfg, [chunk[k] for k in ans], seed, "single_call"))
        outs = run_on(ans, [tpl["single_call"].render(input=chunk[k].text, generation=chosen[k].text) for k in ans], long)
        for k, o in outs.items():
            parsed = parse_single_call(o.text)
            mods[k] = parsed[0] if parsed else ""
            if parsed and parsed[0] and not _same(parsed[0], chunk[k].text):
                # Cut off = the output hit the limit before the end marker (a model may stop right after the answer).
                rejected[k] = type(o)(text=parsed[1], num_tokens=o.num_tokens, finished=o.finished or parsed[2])
    for k, inst in enumerate(chunk):
        cut = {"chosen": not chosen[k].finished, "rejected": k in rejected and not rejected[k].finished}
        if k in too_long:
            rows.append({"id": inst.id, "drop": "too_long", "truncated": cut})
        elif not chosen[k].text.strip():
            rows.append({"id": inst.id, "drop": "empty_chosen", "truncated": cut})
        elif k not in rejected:
            rows.append({"id": inst.id, "drop": "format_break" if not mods[k] else "modified_equals_original", "truncated": cut})
        elif not rejected[k].text.strip():
            rows.append({"id": inst.id, "drop": "empty_rejected", "truncated": cut})
        elif _same(rejected[k].text, chosen[k].text):
            rows.append({"id": inst.id, "drop": "rejected_equals_chosen", "truncated": cut})
        elif cfg.drop_truncated and (cut["chosen"] or cut["rejected"]):
            rows.append({"id": inst.id, "drop": "truncated", "truncated": cut})
        else:
            pair = Pair(
                id=inst.id, instruction=inst.text, chosen=chosen[k].text.strip(), rejected=rejected[k].text.strip(),
                modified=mods[k], split=inst.split, tokens=chosen[k].num_tokens + rejected[k].num_tokens,
            )
            rows.append({"id": inst.id, "pair": to_dict(pair), "truncated": cut})
    return rows


def run(cfg: NegativesConfig, instructions: list[Instruction], model: Generator, seed: int, partial: Partial, chunk_size: int) -> tuple[list[Pair], dict]:
    process = lambda chunk: _pairs_for_chunk(cfg, chunk, model, seed)  # noqa: E731
    saved = run_chunked(partial, instructions, lambda i: i.id, lambda r: r["id"], process, chunk_size,
                        f"generate: pairs (negatives={cfg.method})", "pair")
    rows = {r["id"]: r for r in saved}
    ordered = [rows[i.id] for i in instructions]
    pairs = [from_dict(Pair, r["pair"]) for r in ordered if "pair" in r]
    drops = {reason: sum(r.get("drop") == reason for r in ordered) for reason in DROP_REASONS}
    stats = {"instructions": len(instructions), "pairs": len(pairs), "dropped": {k: v for k, v in drops.items() if v},
             "pairs_train": sum(p.split == "train" for p in pairs), "pairs_heldout": sum(p.split == "heldout" for p in pairs),
             "tokens": sum(p.tokens for p in pairs)}
    # Flat numeric stats, so every reason reaches MLflow as its own metric (generate/dropped/<reason>).
    stats.update({f"dropped/{k}": v for k, v in drops.items()})
    stats["format_break_rate"] = drops["format_break"] / len(instructions) if instructions else 0.0
    for role in ("chosen", "rejected"):
        # Over every instruction that got an answer in that role, kept or dropped; kept pairs only as `*_kept`.
        stats[f"truncated/{role}"] = sum(bool(r.get("truncated", {}).get(role)) for r in ordered)
        stats[f"truncated/{role}_kept"] = sum(bool(r.get("truncated", {}).get(role)) for r in ordered if "pair" in r)
    log.info("generate: negatives=%s made %d pairs from %d instructions, dropped %s; cut off at the token limit: %d chosen, %d rejected",
             cfg.method, len(pairs), len(instructions), stats["dropped"] or "none", stats["truncated/chosen"], stats["truncated/rejected"])
    return pairs, stats


def execute(step: Step, ctx: Context) -> tuple[list[dict], dict]:
    """The pairs, or an error before anything is committed when none of them is for training."""
    instructions = ctx.inputs()["instructions"]
    pairs, stats = run(step.config, instructions, ctx.model(), step.seed, ctx.partial, step.chunk)
    if not any(p.split == "train" for p in pairs):
        raise RuntimeError(f"generate: no training pairs out of {len(instructions)} instructions (dropped: {stats.get('dropped')})")
    return as_rows((pairs, stats))


STAGES = {"generate": Stage(execute, logged=prefixed("generate/"), read=records("generate", Pair))}
