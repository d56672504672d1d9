"""The label-noise audit of the synthetic pairs: does the answer to x beat the answer to x'? Reads the `audit` group.

Two stages, both at iteration 0, after generate:
* `audit` (exact, `audit/*`): pairs whose instruction has a reference answer (GSM8K, MATH: `src/rules/audit.py` reads the
  final answers; no code runs); with `audit.execute` (opt-in, `audit=execute`) also the pairs of code pools, by
  running the pool's unit tests on both responses in `src/sandbox.py`;
* `audit_judge` (estimate, `audit/judge/*`, `audit=judge`): an audit judge model votes on every pair, both orders,
  k samples each; its majority says which response it prefers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Collection

from src.rules import audit as rules
from src import sandbox
from src.cache import Partial, make_key, run_chunked
from src.config import ConfigError, as_dict, knob, typed
from src.data import read_records, resolve
from src.models.base import Generator, ModelSpec, SamplingConfig, model_id
from src.prompts import text_fingerprint
from src.records import ORDERS, Instruction, Pair
from src.judging import fit_prompts, judge_prompts, judge_template, item_seed, pair_parts, token_budget
from src.pool import DatasetConfig, source_rows
from src.step import Context, Stage, Step

log = logging.getLogger(__name__)
VERSION = 2  # of the `audit` output by reference answers; 2: \text{} answers kept, \frac12, percent, "a x b = c", "#### 18 eggs", empty references match nothing
EXEC_VERSION = 1  # of the unit-test reading (program assembly, sandbox outcome): in the key only with execute
JUDGE_VERSION = 1  # of the `audit_judge` output


def logged_stats(stats: dict) -> dict:
    """The stats an `audit` unit logs: a unit cached before `audit/clean` and `audit/inverted` were named so holds
    them as `audit/neither` and `audit/both` (`src/rules/audit.py` RENAMED); its rows, and so its key, are unchanged."""
    return rules.current_names(stats)


@dataclass
class AuditConfig:
    name: str = "references"
    execute: bool = False
    judge: bool = False
    sandbox: sandbox.SandboxConfig = field(default_factory=sandbox.SandboxConfig)
    model: Any = None  # the audit judge's model/ preset (a mapping; typed to a ModelSpec by validate)
    k: int = knob(3, "audit judge samples per pair and order", min=1)
    temperature: float = knob(0.7, "audit judge sampling temperature", min=0)
    top_p: float = knob(0.9, "audit judge nucleus mass", gt=0, max=1)
    max_new_tokens: int = knob(256, "tokens per audit judgment", min=1)
    verdict: str = "constrained"
    verdict_prefix: str = "\n\nFinal verdict: [["
    prompt: str | None = None
    max_response_chars: int = knob(1200, "characters of each response shown to the audit judge", min=1)

    def validate(self, where: str) -> None:
        if self.model is not None and not isinstance(self.model, ModelSpec):
            self.model = typed(ModelSpec, self.model, f"{where}.model")
        if self.judge and self.model is None:
            raise ConfigError(f"{where}.judge=true needs {where}.model: use audit=judge (model@audit.model=<preset> picks another)")
        if self.verdict not in ("parse", "constrained"):
            raise ConfigError(f"{where}.verdict={self.verdict!r}: use parse or constrained")
        if self.k > 1 and self.temperature <= 0:
            raise ConfigError(f"{where}.k={self.k} with {where}.temperature={self.temperature}: greedy samples are identical; use k=1 or temperature > 0")


def planned(cfg: AuditConfig, dataset: DatasetConfig) -> bool:
    """Whether the exact `audit` stage runs: the pool has reference answers, or unit tests are executed."""
    return cfg.execute or any(s.reference_field for s in dataset.sources)


def key(cfg: AuditConfig, generate_key: str) -> str:
    """The `audit` key: the pairs (their key names the selected instructions and the pool files the references come
    from); with `execute`, also the sandbox limits (a tighter timeout changes outcomes) and EXEC_VERSION. Without
    it, exactly the key audits had before the `audit` group existed."""
    if not cfg.execute:
        return make_key("audit", VERSION, {}, {"pairs": generate_key})
    return make_key("audit", VERSION, {"execute": EXEC_VERSION, "sandbox": as_dict(cfg.sandbox)}, {"pairs": generate_key})


def judge_config(cfg: AuditConfig) -> dict:
    """What shapes the audit judge's votes (its key's config): not `execute` or the sandbox."""
    return {k: v for k, v in as_dict(cfg).items() if k in ("k", "temperature", "top_p", "max_new_tokens", "verdict", "verdict_prefix", "max_response_chars")}


def judge_key(cfg: AuditConfig, generate_key: str, random_seed: int) -> str:
    """The `audit_judge` key: the vote settings, the audit model's identity, its prompt's text, the pairs, the seed."""
    return make_key("audit_judge", JUDGE_VERSION, judge_config(cfg), {"pairs": generate_key}, model=model_id(cfg.model, None),
                    random_seed=random_seed, prompt=text_fingerprint(judge_template(cfg.prompt, "judging.prompt")))


def code_rows(dataset: DatasetConfig, data_root: str, ids: Collection[str]) -> dict[str, dict]:
    """The pool rows (with their unit tests) of `ids`, for the sources that carry tests (HumanEval, MBPP fields)."""
    out: dict[str, dict] = {}
    for rid, _, _, _, row in source_rows(dataset, data_root):
        if rid in ids and rid not in out and rules.has_unit_tests(row):
            out[rid] = row
    return out


def check_auditable(dataset: DatasetConfig, data_root: str) -> None:
    """`audit=execute` needs a pool with unit tests or reference answers: checked on each local source's first row
    (a hub source is read when select runs)."""
    if any(s.reference_field or s.path is None for s in dataset.sources):
        return
    for s in dataset.sources:
        first = next(iter(read_records(resolve(s.path, data_root))), None)
        if first is not None and rules.has_unit_tests(first[1]):
            return
    raise ConfigError(f"audit=execute: dataset={dataset.name} has neither unit tests (HumanEval test/entry_point/prompt, "
                      "MBPP test_list) nor reference answers (dataset.sources[].reference_field); use audit=references or audit=judge")


def run(cfg: AuditConfig, dataset: DatasetConfig, data_root: str, instructions: list[Instruction], pairs: list[Pair]) -> tuple[list[dict], dict]:
    """Rows and `audit/*` stats. By reference answer where the instruction has one (rows exactly as before the group
    existed); with `execute`, by unit tests for pairs from a code pool."""
    rows, stats = rules.audit_pairs({i.id: i.reference for i in instructions}, pairs)
    if not cfg.execute:
        return rows, stats
    done = {r["pair_id"] for r in rows}
    todo = [p for p in pairs if p.id not in done]
    tests = code_rows(dataset, data_root, {p.id for p in todo})
    if not rows and not tests:
        raise ValueError(f"audit=execute: none of the {len(pairs)} pairs of dataset={dataset.name} has a reference answer "
                         "(dataset.sources[].reference_field) or unit tests (HumanEval test/entry_point, MBPP test_list)")
    isolated, capped = [], []
    for p in todo:
        if p.id not in tests:
            continue
        ran = {role: sandbox.run(rules.code_program(tests[p.id], getattr(p, role)), cfg.sandbox) for role in ("chosen", "rejected")}
        isolated += [r.network_isolated for r in ran.values()]
        capped += [r.cgroup != "none" for r in ran.values()]
        rows.append({"pair_id": p.id, "split": p.split, "reference": "unit tests",
                     **{f"{role}_{k}": v for role, r in ran.items() for k, v in
                        (("status", r.status), ("seconds", r.seconds), ("stderr", r.stderr_tail[-500:]))},
                     "network_isolated": all(r.network_isolated for r in ran.values()),
                     "cgroup": ran["chosen"].cgroup if ran["chosen"].cgroup == ran["rejected"].cgroup else "none",
                     "outcome": rules.cell(ran["chosen"].status == "passed", ran["rejected"].status == "passed")})
    stats = {**stats, **rules.audit_stats(r["outcome"] for r in rows)}
    executed = [r for r in rows if r["reference"] == "unit tests"]
    stats["audit/executed_pairs"] = float(len(executed))
    if executed:
        statuses = [r[f"{role}_status"] for r in executed for role in ("chosen", "rejected")]
        stats.update({f"audit/exec/{s}": statuses.count(s) / len(statuses) for s in sandbox.STATUSES})
        stats["audit/exec/network_isolated"] = float(all(isolated))
        stats["audit/exec/cgroup"] = float(all(capped))  # memory and tasks capped over all of a program's processes
    log.info("audit: %d pairs by answer, %d by unit tests (network namespace: %s; cgroup totals: %s)", len(rows) - len(executed),
             len(executed), *("yes" if xs and all(xs) else "no" if xs else "n/a" for xs in (isolated, capped)))
    return rows, stats


def run_judge(cfg: AuditConfig, pairs: list[Pair], model: Generator, seed: int, partial: Partial, chunk_size: int) -> tuple[list[dict], dict]:
    """The audit judge's votes on every pair (train and held-out), both orders, k samples each (one seed per pair
    and order: votes do not depend on chunking); rows: per pair, its votes and majority; `audit/judge/*` stats."""
    template = judge_template(cfg.prompt, "judging.prompt")
    work = [(p, o) for p in pairs for o in ORDERS]
    budget = token_budget(model, cfg.max_new_tokens, cfg.verdict)

    def process(chunk: list[tuple[Pair, str]]) -> list[dict]:
        prompts = [f[0] for f in fit_prompts(template, [pair_parts(p, o) for p, o in chunk], cfg.max_response_chars, model, budget)]
        sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.k, seeds=tuple(item_seed(seed, p.id, o) for p, o in chunk))
        outs = judge_prompts(model, prompts, sampling, cfg.verdict, cfg.verdict_prefix)
        return [{"pair_id": p.id, "order": o, "verdicts": [v for _, v, _, _ in samples], "sources": [s for _, _, s, _ in samples],
                 "tokens": sum(n for _, _, _, n in samples)} for (p, o), samples in zip(chunk, outs)]

    saved = run_chunked(partial, work, lambda w: (w[0].id, w[1]), lambda r: (r["pair_id"], r["order"]), process, chunk_size,
                        f"audit judge: {cfg.k} samples x {len(work)} prompts", "prompt")
    by_pair: dict[str, list[dict]] = {}
    for r in saved:
        by_pair.setdefault(r["pair_id"], []).append(r)
    rows = []
    for p in pairs:
        votes = [[r["order"], v] for r in sorted(by_pair[p.id], key=lambda r: ORDERS.index(r["order"])) for v in r["verdicts"]]
        rows.append({"pair_id": p.id, "split": p.split, "votes": votes, "majority": rules.judge_outcome(votes),
                     "text_parse_fail": sum(s != "parsed" for r in by_pair[p.id] for s in r["sources"]),
                     "tokens": sum(r["tokens"] for r in by_pair[p.id])})
    stats = rules.judge_audit_stats(rows)
    if rows:
        stats["audit/judge/text_parse_fail"] = sum(r["text_parse_fail"] for r in rows) / stats["audit/judge/votes"]
        stats["audit/judge/tokens"] = float(sum(r["tokens"] for r in rows))
    return rows, stats


@dataclass(frozen=True)
class AuditStep:
    """The audit step's config: the `audit` group and the pool whose references (answers, unit tests) it reads."""

    audit: AuditConfig
    dataset: DatasetConfig


def execute(step: Step, ctx: Context) -> tuple[list[dict], dict]:
    inputs = ctx.inputs()
    return run(step.config.audit, step.config.dataset, ctx.data_root, inputs["instructions"], inputs["pairs"])


def execute_judge(step: Step, ctx: Context) -> tuple[list[dict], dict]:
    return run_judge(step.config, ctx.inputs()["pairs"], ctx.model(), step.seed, ctx.partial, step.chunk)


def audit_config_part(c: AuditStep) -> dict:
    """What the audit's meta records of its config: the sandbox where programs run, nothing otherwise (its key)."""
    return {"execute": True, "sandbox": as_dict(c.audit.sandbox)} if c.audit.execute else {}


STAGES = {
    "audit": Stage(execute, config_part=audit_config_part, logged=logged_stats),  # audit/* shares, named already
    "audit_judge": Stage(execute_judge, config_part=judge_config),  # audit/judge/* shares, named already
}
