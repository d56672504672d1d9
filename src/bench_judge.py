"""Benchmark: judge-prompt sampling, naive (one prompt, one sample per `generate` call) vs HFGenerator batched.

    python -m src.bench_judge [--model smollm2_135m] [--pairs 8] [--n 2] [--max-new-tokens 48] [--batch-size 8]

Both runs use the same model object and the same prompts (real RewardBench pairs, responses cut to
--response-chars). Throughput counts generated tokens only (EOS and padding excluded).
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rewardbench" / "filtered.jsonl.gz"


def judge_prompts(path: Path, pairs: int, response_chars: int = 400, seed: int = 0) -> list[str]:
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    from .stages.judge import judge_template, render

    template = judge_template(None, "judging.prompt")
    rng = random.Random(seed)
    rows = rng.sample(rows, pairs)
    out = []
    for r in rows:
        a, b = (r["chosen"], r["rejected"]) if rng.random() < 0.5 else (r["rejected"], r["chosen"])
        # The judge stage's own prompt (src/prompts/judge.txt) and clipping.
        out.append(render(template, r["prompt"], a, b, response_chars))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive(gen, prompts: list[str], n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int):
    import torch

    model, tok = gen.model, gen.tokenizer
    eos = set(gen.eos_ids)
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ids = torch.tensor([gen._encode(gen.chat_text(p))])
            for k in range(n):
                torch.manual_seed(seed + i * n + k)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                     eos_token_id=gen.eos_ids, pad_token_id=tok.pad_token_id)
                new = out[0, ids.shape[1]:].tolist()
                stop = next((j for j, t in enumerate(new) if t in eos), len(new))
                tokens += stop
    return tokens, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help="packaged model name, or tiny_random")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--response-chars", type=int, default=400)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)

    import torch

    from .models.base import ModelSpec, SamplingConfig
    from .models.hf import HFGenerator
    from .models.loading import preflight, resolve_model_dir

    source = "tiny_random" if args.model == "tiny_random" else "packaged"
    spec = ModelSpec(name=args.model, source=source, package=args.model if source == "packaged" else None,
                     batch_size=args.batch_size)
    preflight(spec)
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(spec, args.cache_dir)
    t_resolve = time.perf_counter() - t0
    gen = HFGenerator(spec, model_dir)
    prompts = judge_prompts(args.data, args.pairs, args.response_chars, args.seed)
    lens = [len(gen._encode(gen.chat_text(p))) for p in prompts]
    print(f"model {args.model}: resolve {t_resolve:.1f} s, load {gen.load_seconds:.1f} s, torch threads "
          f"{torch.get_num_threads()}; {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens "
          f"(mean {sum(lens) / len(lens):.0f}), n={args.n}, max_new_tokens={args.max_new_tokens}, "
          f"batch_size={args.batch_size}")
    gen.generate(prompts[:1], SamplingConfig(max_new_tokens=4))  # warm-up (allocator, kernels)

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              n=args.n, seed=args.seed)
    t0 = time.perf_counter()
    res = gen.generate(prompts, sampling)
    t_b = time.perf_counter() - t0
    tok_b = sum(c.num_tokens for r in res for c in r)
    fin_b = sum(c.finished for r in res for c in r)
    result = {"model": args.model, "batched_tokens": tok_b, "batched_s": t_b, "batched_tok_s": tok_b / t_b,
              "load_s": gen.load_seconds, "resolve_s": t_resolve}
    if not args.skip_naive:
        tok_n, t_n = naive(gen, prompts, args.n, args.max_new_tokens, args.temperature, args.top_p, args.seed)
        result.update(naive_tokens=tok_n, naive_s=t_n, naive_tok_s=tok_n / t_n)
    result["peak_rss_mb"] = peak_rss_mb()

    print(f"{'':10s} {'tokens':>8s} {'seconds':>9s} {'tok/s':>8s}")
    if not args.skip_naive:
        print(f"{'naive':10s} {tok_n:8d} {t_n:9.1f} {tok_n / t_n:8.1f}")
    print(f"{'batched':10s} {tok_b:8d} {t_b:9.1f} {tok_b / t_b:8.1f}   ({fin_b}/{len(prompts) * args.n} ended at EOS)")
    if not args.skip_naive:
        result["ratio"] = (tok_b / t_b) / (tok_n / t_n)
        print(f"ratio batched/naive tok/s: {result['ratio']:.2f}x")
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    print("sample:", repr(res[0][0].text[:300]))
    gen.close()
    return result


if __name__ == "__main__":
    main()
