"""The dry run's GPU-hours estimate of a plan: token counts from the config (and the benchmark files, when local)
times an assumed throughput per parameter. An estimate, not a measurement: nothing here has been timed on a GPU.

Assumptions (all in this module's constants; docs/gpus-and-vllm.md shows the figures):
- compute: 2 FLOPs per active parameter per token to run a model, 6 to train it (8 with activation checkpointing's
  recomputed forward; LoRA: 4 and 6, no weight gradients for the frozen base); attention's own FLOPs ignored
  (small next to the weights at these lengths);
- an H100 SXM (989 dense bf16 TFLOP/s) running vLLM at 40% of that in prefill and 10% in decode (what vLLM's
  published offline throughput of Llama-3-8B on 1 H100 and 70B over 4-8 H100 works out to), training at 35%; the
  GPU count then cancels out of GPU-hours (not of wall-clock);
- 4 characters per token; a prompt's instruction ~250 tokens (WildChat first turns; pools are read only when the
  benchmarks are local files); generations stop on their own at ~500 tokens (answers), ~600 (judgments), the
  instruction's length (a modified instruction), capped by each max_new_tokens. The second figure printed assumes
  every generation runs to its max_new_tokens: an upper bound;
- classification scores each scanned instruction once per label, each row prefilling the whole classify prompt
  (no prefix reuse under prompt_logprobs in vLLM), up to max_scan instructions;
- no pair is dropped, every pair and order yields a training example (filter=all: every judgment), and a model on
  the HF backend with min_gpus 0 runs on CPU (no GPU-hours).
Pure functions of the typed configs, so `describe` is cheap and prints before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass

PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
MFU = {"prefill": 0.40, "decode": 0.10, "train": 0.35}
CHARS_PER_TOKEN = 4.0
TYPICAL = {"instruction": 250, "answer": 500, "judgment": 600}
CHAT_OVERHEAD = 20  # chat-template tokens around a prompt
RB_SUBSETS = 23


@dataclass
class Work:
    """Token counts of one stage on one model: prompt tokens prefilled, tokens generated, tokens trained on."""

    prefill: float = 0.0
    decode: float = 0.0
    train: float = 0.0

    def __iadd__(self, other: Work) -> Work:
        self.prefill += other.prefill
        self.decode += other.decode
        self.train += other.train
        return self


def gpu_hours(work: Work, active_params: float, full_finetune: bool = True, checkpointing: bool = True) -> float:
    per_token_train = (6 if full_finetune else 4) + (2 if checkpointing else 0)
    seconds = (2 * active_params * work.prefill / (PEAK_FLOPS * MFU["prefill"])
               + 2 * active_params * work.decode / (PEAK_FLOPS * MFU["decode"])
               + per_token_train * active_params * work.train / (PEAK_FLOPS * MFU["train"]))
    return seconds / 3600


def _tok(chars: float) -> float:
    return chars / CHARS_PER_TOKEN


def _gen(max_new_tokens: int, typical: int, upper: bool) -> float:
    return float(max_new_tokens if upper else min(max_new_tokens, typical))


def _template_tokens(t) -> float:
    return _tok(len(t.text) + len(t.system or ""))


def classify_work(d, instr: float) -> Work:
    """select's classification (src/classification.py), prefill only (one sampled token per row ignored): every
    scanned instruction, in whole chunks of classify.CHUNK, and every content-free calibration input is scored once
    per label, one row per (prompt, label) (`score_options`); under prompt_logprobs vLLM reads no prefix cache, so
    each row prefills the whole prompt. At most max_scan instructions (category `any`: until `limit` are labelled);
    a one-label set needs no model."""
    import math

    from src.stages import select
    from src import classification as classify

    cats = d.categories
    if len(cats) < 2:
        return Work()
    wanted = d.max_scan if d.category != "any" else min(d.limit, d.max_scan)
    scanned = math.ceil(wanted / classify.CHUNK) * classify.CHUNK
    context = CHAT_OVERHEAD + _template_tokens(select.classify_template(d)) + _tok(len(", ".join(cats)) + len(classify.PREFIX))
    labels = sum(_tok(len(" " + c)) for c in cats)  # the trailing space moves onto each label

    def rows(x: float) -> float:  # one prompt's rows: context + x + label, for every label
        return len(cats) * (context + x) + labels

    return Work(scanned * rows(instr) + sum(rows(_tok(len(t))) for t in d.content_free))


def stage_work(job, upper: bool, data_root: str | None = None) -> dict[str, tuple[str, Work]]:
    """{stage: (role, Work)} for the whole plan; role names the model ("seed", "judge", "audit") that runs it."""
    from src import judging
    from src.stages import evaluate, generate

    d, neg, jg, ev = job.dataset, job.negatives, job.judging, job.eval
    instr = min(TYPICAL["instruction"], _tok(d.max_chars))
    answer = _gen(neg.answer_max_new_tokens, TYPICAL["answer"], upper)
    tpl = generate.templates(neg)
    n = d.limit
    gen = Work()
    gen += Work(n * (instr + CHAT_OVERHEAD), n * answer)  # the chosen answer
    if neg.method == "worse_rewrite":
        gen += Work(n * (_template_tokens(tpl["rewrite"]) + instr + answer), n * answer)
    elif neg.mode == "two_step":
        mod = _gen(neg.modify_max_new_tokens, int(instr), upper)
        gen += Work(n * (_template_tokens(tpl["modify"]) + instr), n * mod)
        gen += Work(n * (mod + CHAT_OVERHEAD), n * answer)
    else:
        gen += Work(n * (_template_tokens(tpl["single_call"]) + instr + answer),
                    n * _gen(neg.modify_max_new_tokens + neg.answer_max_new_tokens, int(instr + answer), upper))
    classify = classify_work(d, instr)

    # judge: every training pair in each order, n samples sharing one prefill
    orders = 2 if jg.both_orders else 1
    train_pairs = n * (1 - d.heldout_fraction)
    jtpl = judging.judge_template(jg.prompt, "judging.prompt")
    resp = min(answer, _tok(jg.max_response_chars))
    judge_prompt = min(_template_tokens(jtpl) + instr + 2 * resp, job.judge.max_model_len - jg.max_new_tokens)
    judgment = _gen(jg.max_new_tokens, TYPICAL["judgment"], upper)
    judge_work = Work(train_pairs * orders * judge_prompt, train_pairs * orders * jg.n * judgment)
    examples = train_pairs * orders * (jg.n if job.filter.name == "all" else 1)
    train_work = Work(train=examples * min(judge_prompt + judgment, job.train.max_length) * job.train.num_epochs)

    # evaluate, once per iteration and for the untrained judge: the benchmarks' own prompts when local
    evaluation = Work()
    for _, w in benchmark_work(job, upper, data_root).values():
        evaluation += w

    iters = job.iterations
    first = "seed" if job.pipeline.first_judge == "seed" else "judge"
    out = {"classify": ("seed", classify), "generate": ("seed", gen),
           "evaluate": ("judge", Work(evaluation.prefill * (iters + 1), evaluation.decode * (iters + 1)))}
    if iters:
        out["judge (iteration 1)"] = (first, judge_work)
        if iters > 1:
            out["judge (iterations 2+)"] = ("judge", Work(judge_work.prefill * (iters - 1), judge_work.decode * (iters - 1)))
        out["train"] = ("judge", Work(train=train_work.train * iters))
    au = job.audit
    if au.judge:  # every pair (train and held out) in both orders, k samples sharing one prefill, on the audit model
        aprompt = min(_template_tokens(jtpl) + instr + 2 * min(answer, _tok(au.max_response_chars)), au.model.max_model_len - au.max_new_tokens)
        out["audit judge"] = ("audit", Work(n * 2 * aprompt, n * 2 * au.k * _gen(au.max_new_tokens, TYPICAL["judgment"], upper)))
    return out


def benchmark_work(job, upper: bool, data_root: str | None = None) -> dict[str, tuple[float, Work]]:
    """{benchmark: (judgments, Work)} of one evaluation of the judge: the benchmarks' own prompts when local."""
    from src import judging
    from src.stages import evaluate, generate

    d, neg, ev = job.dataset, job.negatives, job.eval
    instr = min(TYPICAL["instruction"], _tok(d.max_chars))
    answer = _gen(neg.answer_max_new_tokens, TYPICAL["answer"], upper)
    etpl = judging.judge_template(ev.prompt, "eval.prompt")
    ejudgment = _gen(ev.max_new_tokens, TYPICAL["judgment"], upper)
    budget = job.judge.max_model_len - ev.max_new_tokens
    c = ev.max_response_chars

    def prompt_tokens(parts) -> float:
        x, a, b = parts
        return min(_template_tokens(etpl) + _tok(min(len(x), 2 * c) + min(len(a), c) + min(len(b), c)), budget)

    out = {}
    if ev.synthetic:
        held = d.limit * d.heldout_fraction * 2
        k = ev.synthetic_maj_k  # greedy, then (k > 1) k samples in a second call that prefills the prompt again
        out["synthetic"] = (held, Work(held * min(_template_tokens(etpl) + instr + 2 * min(answer, _tok(c)), budget) * (2 if k > 1 else 1),
                                       held * ejudgment * (1 + (k if k > 1 else 0))))
    for name, enabled, items_of in (("rewardbench", ev.rewardbench.enabled, evaluate.rewardbench_items),
                                    ("mtbench", ev.mtbench.enabled, evaluate.mtbench_items)):
        if not enabled:
            continue
        try:
            items = items_of(ev, data_root) if data_root is not None and _local(getattr(ev, name).source, data_root) else None
        except Exception:  # noqa: BLE001 - an unreadable file is preflight's to report; estimate without it
            items = None
        if items is None:  # a hub source: RewardBench's mean item (measured on the local copy: 1,562 characters)
            count = (2985 if ev.rewardbench.per_subset is None else RB_SUBSETS * ev.rewardbench.per_subset) if name == "rewardbench" else 0
            count *= 2 if ev.rewardbench.orders == "both" else 1
            prefill = count * min(_template_tokens(etpl) + _tok(1562), budget)
        else:
            count, prefill = len(items), sum(prompt_tokens(it.parts) for it in items)
        k = ev.rewardbench.maj_k if name == "rewardbench" else 1
        # greedy, then (maj_k > 1) k samples in a second call that prefills the prompt again
        out[name] = (count, Work(prefill * (2 if k > 1 else 1), count * ejudgment * (1 + (k if k > 1 else 0))))
    return out


def shard_rows(job, data_root: str | None = None) -> list[dict] | None:
    """The dry run's per-stage shard budget for the configured executor and worker count (src/shards.py): per
    generation stage, how often it runs, its items and shards, the tokens it generates, its GPU-hours (all runs)
    and its wall-clock with `pipeline.workers` shards at once (each task on its model's GPUs; the model load per
    task not counted). None when a model's size is unknown."""
    from src.costs.memory import model_shape

    pipe, d = job.pipeline, job.dataset
    train_items = d.limit * (1 - d.heldout_fraction) * (2 if job.judging.both_orders else 1)
    first = job.seed if pipe.first_judge == "seed" else job.judge
    work = stage_work(job, False, data_root)
    runs = [("generate", job.seed, 1, d.limit, work["generate"][1])]
    if job.audit.judge:
        runs.append(("audit_judge", job.audit.model, 1, d.limit * 2, work["audit judge"][1]))
    if job.iterations:
        jw = work["judge (iteration 1)"][1]
        runs.append(("judge (iter 1)", first, 1, train_items, jw))
        if job.iterations > 1:
            runs.append(("judge (iter 2+)", job.judge, job.iterations - 1, train_items, jw))
    for name, (count, w) in benchmark_work(job, False, data_root).items():
        runs.append((name, job.judge, job.iterations + 1, count, w))
    workers = pipe.workers if pipe.sharded else 1
    rows = []
    for stage, spec, n, items, w in runs:
        shard = pipe.chunk_for(spec) * pipe.chunks_per_shard(spec)
        shards = max(1, -(-int(round(items)) // shard))
        row = {"stage": stage, "runs": n, "items": items, "shards": shards, "tokens": w.decode * n, "gpu_hours": None, "wall_hours": None}
        if on_gpu(spec):
            shape = model_shape(spec)
            if shape is None:
                return None
            h = gpu_hours(w, (shape.active_b or shape.params_b) * 1e9)  # one run
            per_shard = h / shards / gpus_of(spec)
            row.update(gpu_hours=h * n, wall_hours=n * per_shard * -(-shards // workers))
        rows.append(row)
    return rows


def describe_shards(job, data_root: str | None = None) -> str:
    rows = shard_rows(job, data_root)
    pipe = job.pipeline
    head = (f"  shards (estimate: throughput as in the gpu-hours line; generation stages only; pipeline.executor={pipe.executor} pipeline.workers={pipe.workers}, "
            f"pipeline.shard_size={pipe.shard_size or 'one chunk'}):")
    if rows is None:
        return head + " unknown model size (not estimated)"
    lines = [head, f"    {'stage':<16} {'runs':>4} {'items/run':>10} {'shards/run':>10} {'gen tokens':>11} {'GPU-h':>8} {'wall-clock':>11}"]
    for r in rows:
        gh = "cpu" if r["gpu_hours"] is None else f"{r['gpu_hours']:,.1f}"
        wall = "-" if r["wall_hours"] is None else f"{r['wall_hours']:,.2f} h"
        lines.append(f"    {r['stage']:<16} {r['runs']:>4} {r['items']:>10,.0f} {r['shards']:>10,} {r['tokens'] / 1e6:>10,.1f}M {gh:>8} {wall:>11}")
    gpu = [r for r in rows if r["gpu_hours"] is not None]
    if gpu:
        lines.append(f"    {'total':<16} {'':>4} {'':>10} {'':>10} {sum(r['tokens'] for r in rows) / 1e6:>10,.1f}M "
                     f"{sum(r['gpu_hours'] for r in gpu):>8,.1f} {sum(r['wall_hours'] for r in gpu):>9,.2f} h")
    return "\n".join(lines)


def _local(source: str, data_root: str) -> bool:
    from src.data import resolve

    return resolve(source, data_root).exists()


def on_gpu(spec) -> bool:
    return spec.backend == "vllm" or spec.min_gpus > 0


def gpus_of(spec) -> int:
    return max(spec.min_gpus, spec.tensor_parallel_size if spec.backend == "vllm" else 1, 1)


def estimate(job, upper: bool, data_root: str | None = None) -> dict[str, dict[str, float]] | None:
    """{stage: {"gpu_hours", "wall_hours"}}, or None when a model's size is unknown."""
    from src.costs.memory import full_finetune, model_shape

    specs = {"seed": job.seed, "judge": job.judge, **({"audit": job.audit.model} if job.audit.judge else {})}
    shapes = {r: model_shape(s) for r, s in specs.items()}
    out = {}
    for stage, (role, work) in stage_work(job, upper, data_root).items():
        spec, shape = specs[role], shapes[role]
        if stage == "train":
            gpus = job.launch.world_size
            if not on_gpu(job.judge) and gpus == 1:
                continue
        else:
            if not on_gpu(spec):
                continue
            gpus = gpus_of(spec)
        if shape is None:
            return None
        h = gpu_hours(work, (shape.active_b or shape.params_b) * 1e9, full_finetune(job.train), job.launch.activation_checkpointing)
        out[stage] = {"gpu_hours": h, "wall_hours": h / gpus}
    return out


def held_gpus(job) -> int:
    """GPUs one allocation must hold for the whole run: the most any stage needs (train: the launch's world)."""
    specs = [job.seed, job.judge, *([job.audit.model] if job.audit.judge else [])]
    gpus = [gpus_of(s) for s in specs if on_gpu(s)]
    if job.iterations and (on_gpu(job.judge) or job.launch.world_size > 1):
        gpus.append(job.launch.world_size)
    return max(gpus, default=0)


def describe(job, data_root: str | None = None) -> str:
    """The dry run's GPU-hours line(s)."""
    typical, upper = estimate(job, False, data_root), estimate(job, True, data_root)
    if typical is None or upper is None:
        return "  gpu-hours: unknown model size (not estimated)"
    if not typical:
        return "  gpu-hours: none (every stage runs on CPU)"
    total = sum(v["gpu_hours"] for v in typical.values())
    wall = sum(v["wall_hours"] for v in typical.values())
    parts = ", ".join(f"{k} {v['gpu_hours']:.0f}" if v["gpu_hours"] >= 10 else f"{k} {v['gpu_hours']:.2g}" for k, v in typical.items())
    held = wall * held_gpus(job)  # the allocation holds its largest stage's GPUs for the whole run: what is billed
    return (f"  gpu-hours (estimate, H100 bf16 at assumed utilisation; src/costs/estimate.py): ~{total:,.0f} GPU-h used, "
            f"~{held:,.0f} GPU-h held ({held_gpus(job)} GPUs x ~{wall:,.0f} h wall) "
            f"({parts}); every generation at its max_new_tokens: ~{sum(v['gpu_hours'] for v in upper.values()):,.0f} GPU-h")


def token_budgets(job) -> list[dict]:
    """The dry run's per-stage worst case against each model's context: the longest prompt the config admits plus
    the generation it asks for, vs max_model_len. Prompts at 4 characters per token (English) and at 1 (`dense`:
    CJK scripts come close to a token per character). `over` says what the stage does with a prompt that does not
    fit: nothing aborts (judging.fit_prompts, classify.fit, generate's base.fits)."""
    from src import classification as classify
    from src import judging
    from src.stages import generate, select

    d, neg, jg, ev = job.dataset, job.negatives, job.judging, job.eval
    rows = []

    def row(stage, spec, prompt_chars, fixed, new, over, room=None):
        tok = lambda cpt: fixed + prompt_chars / cpt + CHAT_OVERHEAD  # noqa: E731
        rows.append({"stage": stage, "model": spec.name, "prompt": tok(CHARS_PER_TOKEN), "dense": tok(1.0),
                     "new": new, "max_model_len": spec.max_model_len, "over": over,
                     "room": spec.max_model_len - new if room is None else room})

    if d.category != "any" and len(d.categories) > 1:
        labels = len(classify.PREFIX) + max(len(c) for c in d.categories)
        row("classify", job.seed, d.max_chars, _template_tokens(select.classify_template(d)), labels,
            "instruction cut in the middle (select/classify_clipped)")
    tpl = generate.templates(neg)
    drop = "pair dropped (generate/dropped/too_long)"
    row("generate: chosen answer", job.seed, d.max_chars, 0, neg.answer_max_new_tokens, drop)
    if neg.method == "worse_rewrite":
        row("generate: worse rewrite", job.seed, d.max_chars, _template_tokens(tpl["rewrite"]) + neg.answer_max_new_tokens,
            neg.answer_max_new_tokens, drop)
    elif neg.mode == "two_step":
        row("generate: modify", job.seed, d.max_chars, _template_tokens(tpl["modify"]), neg.modify_max_new_tokens, drop)
        row("generate: rejected answer", job.seed, 0, neg.modify_max_new_tokens, neg.answer_max_new_tokens, drop)
    else:
        row("generate: single call", job.seed, d.max_chars, _template_tokens(tpl["single_call"]) + neg.answer_max_new_tokens,
            neg.modify_max_new_tokens + neg.answer_max_new_tokens, drop)
    cut = "responses, then the instruction, cut to fit"
    first = job.seed if job.pipeline.first_judge == "seed" else job.judge
    # a judge prompt shows the instruction (to 2 x max_response_chars) and both responses (each to max_response_chars)
    jtpl = _template_tokens(judging.judge_template(jg.prompt, "judging.prompt"))
    for spec in ([first] + ([job.judge] if job.judge != first else [])) if job.iterations else []:
        cap = judging.training_budget(jg, spec, job.judge, job.train.max_length)
        row("judge", spec, min(2 * jg.max_response_chars, d.max_chars) + 2 * min(jg.max_response_chars, 4 * neg.answer_max_new_tokens),
            jtpl, jg.max_new_tokens + judging.verdict_margin(jg.verdict), cut if cap is None else cut + f" (to {cap:,}: what {job.judge.name} trains on)", cap)
    etpl = _template_tokens(judging.judge_template(ev.prompt, "eval.prompt"))
    row("evaluate", job.judge, 4 * ev.max_response_chars, etpl, ev.max_new_tokens + judging.verdict_margin(ev.verdict), cut)
    if job.audit.judge:
        au = job.audit
        row("audit judge", au.model, min(2 * au.max_response_chars, d.max_chars) + 2 * min(au.max_response_chars, 4 * neg.answer_max_new_tokens),
            jtpl, au.max_new_tokens, cut)
    return rows


def describe_budgets(job) -> str:
    lines = ["  token budget (longest prompt + new tokens vs max_model_len; prompts at 4 chars/token, [at 1 char/token]):"]
    for r in token_budgets(job):
        room = r["room"]
        state = lambda p: "fits" if p <= room else "over"  # noqa: E731
        lines.append(f"    {r['stage']:<26} {r['model']:<16} {r['prompt']:>7,.0f} [{r['dense']:>7,.0f}] + {r['new']:>6,} "
                     f"of {r['max_model_len']:>7,}: {state(r['prompt'])} [{state(r['dense'])}]; a prompt over {room:,}: {r['over']}")
    return "\n".join(lines)
