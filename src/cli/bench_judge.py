"""Benchmark: judge-prompt sampling, naive (one prompt, one sample per `generate` call) vs HFGenerator batched
vs the llama.cpp engine (LlamaCppGenerator, when installed), side by side on the same prompts.

    python -m src.cli.bench_judge [--model smollm2_135m] [--pairs 8] [--n 2] [--max-new-tokens 48] [--batch-size 8]

All runs use the same prompts (real RewardBench pairs in the judge stage's template, responses cut to
--response-chars). Throughput counts generated tokens only (EOS and padding excluded). For llama.cpp it also
prints the engine's own rate (tokens / time inside llama_decode): the rest is the stage path's overhead
(sampling, batching, detokenising). `choose` is the evaluation's constrained verdict read ([[A]] vs [[B]] after
the prompt): seconds per prompt, which is prefill.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "rewardbench" / "filtered.jsonl.gz"


def judge_prompts(path: Path, pairs: int, response_chars: int = 400, seed: int = 0) -> list[str]:
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    from src.judging import judge_template, render

    template = judge_template(None, "judging.prompt")
    rng = random.Random(seed)
    rows = rng.sample(rows, pairs)
    out = []
    for r in rows:
        a, b = (r["chosen"], r["rejected"]) if rng.random() < 0.5 else (r["rejected"], r["chosen"])
        # The judge stage's own prompt (src/prompts/judge.txt) and clipping.
        out.append(render(template, r["prompt"], a, b, response_chars))
    return out


def model_spec(name: str, batch_size: int):
    """The HF form of conf/model/<name>.yaml (what the stages load), with this benchmark's batch size; the
    llama.cpp run takes the same spec with backend llamacpp, so its engine settings (extra.*) are the stages' too."""
    import dataclasses

    from omegaconf import OmegaConf

    from src.config import CONF_DIR, typed
    from src.models.base import ModelSpec

    path = Path(CONF_DIR) / "model" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"--model {name}: no {path}")
    spec = typed(ModelSpec, OmegaConf.load(path), f"model {name}")
    return dataclasses.replace(spec, backend="hf", batch_size=batch_size)


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
    ap.add_argument("--engines", default="hf,llamacpp", help="comma-separated: hf, llamacpp")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)

    import torch

    from src.models.base import SamplingConfig
    from src.models.hf import HFGenerator
    from src.models.loading import preflight, resolve_model_dir

    spec = model_spec(args.model, args.batch_size)
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
    result["hf_choose_s_per_prompt"], result["hf_read_s_per_prompt"] = choose_times(gen, prompts, res)
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    print("sample:", repr(res[0][0].text[:300]))
    gen.close()
    if "llamacpp" in args.engines.split(","):
        result.update(bench_llamacpp(spec, model_dir, prompts, sampling, args))
        r = result
        print(f"ratio llama.cpp/HF batched tok/s: {r['llamacpp_tok_s'] / r['batched_tok_s']:.2f}x")
        print(f"s/prompt, HF vs llama.cpp: prefill (cold constrained verdict) {r['hf_choose_s_per_prompt']:.2f} vs "
              f"{r['llamacpp_choose_s_per_prompt']:.2f} ({r['hf_choose_s_per_prompt'] / r['llamacpp_choose_s_per_prompt']:.2f}x); "
              f"verdict read after a judgment {r['hf_read_s_per_prompt']:.2f} vs {r['llamacpp_read_s_per_prompt']:.2f} "
              f"({r['hf_read_s_per_prompt'] / r['llamacpp_read_s_per_prompt']:.2f}x)")
    else:
        print(f"s/prompt (HF): cold constrained verdict {result['hf_choose_s_per_prompt']:.2f}, read after a judgment {result['hf_read_s_per_prompt']:.2f}")
    return result


def bench_llamacpp(spec, model_dir, prompts: list[str], sampling, args) -> dict:
    import dataclasses

    from src.models.base import SamplingConfig
    from src.models.llamacpp import available
    from src.models.loading import load_generator

    if not available():
        print('llama.cpp: llama-cpp-python not installed (pip install -e ".[cpu]")')
        return {}
    gen = load_generator(dataclasses.replace(spec, backend="llamacpp"), cache_dir=args.cache_dir)  # as the stages load it
    print(f"llama.cpp weights: {gen.gguf_path.name}")
    gen.generate(prompts[:1], SamplingConfig(max_new_tokens=4))  # warm-up
    gen.reset_cache()
    gen.decode_seconds, gen.reused_tokens = 0.0, 0
    t0 = time.perf_counter()
    res = gen.generate(prompts, sampling)
    t = time.perf_counter() - t0
    tok = sum(c.num_tokens for r in res for c in r)
    fin = sum(c.finished for r in res for c in r)
    engine_s = gen.decode_seconds
    prompt_tokens = sum(len(gen._encode(gen.chat_text(p))) for p in prompts)
    print(f"llama.cpp prefix cache: {gen.reused_tokens} of {prompt_tokens} prompt tokens reused")
    choose_s, read_s = choose_times(gen, prompts, res, reset=gen.reset_cache)
    print(f"{'llama.cpp':10s} {tok:8d} {t:9.1f} {tok / t:8.1f}   ({fin}/{len(prompts) * args.n} ended at EOS; "
          f"load {gen.load_seconds:.1f} s)")
    print(f"{'  engine':10s} {tok:8d} {engine_s:9.1f} {tok / engine_s:8.1f}   (time inside llama_decode, prefill included; "
          f"stage overhead {100 * (1 - engine_s / t):.1f} %)")
    print("sample:", repr(res[0][0].text[:300]))
    gen.close()
    return {"llamacpp_tokens": tok, "llamacpp_s": t, "llamacpp_tok_s": tok / t, "llamacpp_engine_s": engine_s,
            "llamacpp_overhead": 1 - engine_s / t, "llamacpp_choose_s_per_prompt": choose_s, "llamacpp_read_s_per_prompt": read_s,
            "peak_rss_mb": peak_rss_mb()}


def choose_times(gen, prompts: list[str], judged, reset=None) -> tuple[float, float]:
    """Seconds per prompt of (a) a constrained verdict straight after the prompt, from a cold start: prefill;
    (b) the evaluation's read of a judgment that named no verdict: prompt + judgment + "Final verdict: [[" (after
    `generate`, as evaluate.judge_items does it; an engine with a prefix cache reuses the judged prompt)."""
    t0 = time.perf_counter()
    gen.choose(prompts, [r[0].text + "\n\nFinal verdict: [[" for r in judged], ["A]]", "B]]"])
    read = (time.perf_counter() - t0) / len(prompts)
    if reset is not None:
        reset()
    t0 = time.perf_counter()
    gen.choose(prompts, ["[["] * len(prompts), ["A]]", "B]]"])
    return (time.perf_counter() - t0) / len(prompts), read


if __name__ == "__main__":
    main()
