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

from ..cache import Partial, make_key, run_chunked
from ..config import ConfigError, as_dict
from ..models.base import Generator, ModelSpec, SamplingConfig, model_id
from ..prompts import load_template, text_fingerprint
from ..records import Instruction, Pair, from_dict, to_dict
from .judge import item_seed

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
DROP_REASONS = ("empty_chosen", "format_break", "modified_equals_original", "empty_rejected", "rejected_equals_chosen",
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


def _pairs_for_chunk(cfg: NegativesConfig, chunk: list[Instruction], model: Generator, seed: int) -> list[dict]:
    """Rows for the partial file: {"id", "pair": {...}} or {"id", "drop": reason}."""
    answer = SamplingConfig(cfg.answer_max_new_tokens, cfg.temperature, cfg.top_p, 1, seed, _seeds(cfg, chunk, seed, "answer"))
    chosen = [c[0] for c in model.generate([i.text for i in chunk], answer)]
    rows: list[dict] = []
    tpl = templates(cfg)
    if cfg.method == "worse_rewrite":
        # No x': the rejected response is a worse rewrite of the chosen answer to x itself.
        rewrite = dataclasses.replace(answer, seeds=_seeds(cfg, chunk, seed, "rewrite"))
        outs = model.generate([tpl["rewrite"].render(input=i.text, generation=c.text) for i, c in zip(chunk, chosen)], rewrite)
        mods = ["" for _ in chunk]
        rejected = {k: o[0] for k, o in enumerate(outs)}
    elif cfg.mode == "two_step":
        modify = SamplingConfig(cfg.modify_max_new_tokens, cfg.temperature, cfg.top_p, 1, seed + 1, _seeds(cfg, chunk, seed, "modify"))
        mods = [clean_modified(c[0].text) for c in model.generate([tpl["modify"].render(input=i.text) for i in chunk], modify)]
        ok = [k for k, m in enumerate(mods) if m and not _same(m, chunk[k].text)]
        seeds = _seeds(cfg, [chunk[k] for k in ok], seed, "rejected")
        rejected = {k: c[0] for k, c in zip(ok, model.generate([mods[k] for k in ok], dataclasses.replace(answer, seeds=seeds)))} if ok else {}
    else:
        prompts = [tpl["single_call"].render(input=i.text, generation=c.text) for i, c in zip(chunk, chosen)]
        long = SamplingConfig(cfg.modify_max_new_tokens + cfg.answer_max_new_tokens, cfg.temperature, cfg.top_p, 1, seed + 1,
                              _seeds(cfg, chunk, seed, "single_call"))
        outs = [c[0] for c in model.generate(prompts, long)]
        mods, rejected, ok = [], {}, []
        for k, o in enumerate(outs):
            parsed = parse_single_call(o.text)
            mods.append(parsed[0] if parsed else "")
            if parsed and parsed[0] and not _same(parsed[0], chunk[k].text):
                # Cut off = the output hit the limit before the end marker (a model may stop right after the answer).
                rejected[k] = type(o)(text=parsed[1], num_tokens=o.num_tokens, finished=o.finished or parsed[2])
                ok.append(k)
    for k, inst in enumerate(chunk):
        cut = {"chosen": not chosen[k].finished, "rejected": k in rejected and not rejected[k].finished}
        if not chosen[k].text.strip():
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
