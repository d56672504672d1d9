"""Benchmark: llama.cpp's raw prefill and batched decode for the engine's settings side by side in one run: KV layout
(one unified buffer vs one stream per slot), flash attention on/off, and the weight file (as packaged vs re-encoded)
(docs/cpu-engine.md: why src/models/llamacpp.py uses per-slot streams, no flash attention, and f32 for SmolLM2).

    python scripts/bench_llamacpp.py [--model smollm2_135m] [--slots 16] [--prompt 500] [--new 48]
                                     [--types packaged,f32,q8_0] [--layouts per-slot,unified] [--flash off,on]

Each setting runs in its own process (one engine per process, as the stages have), on random token ids (the cost
of a decode does not depend on their values): `slots` prompts of `prompt` tokens prefilled one by one (as `_load`
does), then `new` decode steps of all slots together. A re-encoded file is made once under the model cache.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(gguf: str, unified: bool, flash: bool, slots: int, prompt: int, new: int, ctx_per_slot: int) -> dict:
    """Prefill and decode rates of one engine setting (run in a child process)."""
    import os

    import numpy as np
    import llama_cpp as L
    from llama_cpp import _logger

    from src.models.llamacpp import model_params

    _logger.set_verbose(False)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(gguf.encode(), model_params(L.llama_model_default_params()))
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max = slots * ctx_per_slot, slots
    cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = os.cpu_count() or 1
    cp.kv_unified = unified
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(512, 0, 1)
    rng = np.random.default_rng(0)

    def decode(rows):
        for start in range(0, len(rows), 512):
            chunk = rows[start:start + 512]
            for k, (t, p, s, w) in enumerate(chunk):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = t, p, 1, w
                batch.seq_id[k][0] = s
            batch.n_tokens = len(chunk)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

    decode([(int(t), i, 0, 0) for i, t in enumerate(rng.integers(100, 30000, 16))])  # warm-up
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    for s in range(slots):
        decode([(int(t), i, s, int(i == prompt - 1)) for i, t in enumerate(rng.integers(100, 30000, prompt))])
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for g in range(new):
        decode([(int(rng.integers(100, 30000)), prompt + g, s, 1) for s in range(slots)])
    t_decode = time.perf_counter() - t0
    return {"prefill_tok_s": slots * prompt / t_prefill, "decode_tok_s": slots * new / t_decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help="a packaged model (conf/model/<name>.yaml)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=500)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--types", default="packaged,f32,q8_0", help="weight files: packaged, or extra.gguf_type values")
    ap.add_argument("--layouts", default="per-slot,unified")
    ap.add_argument("--flash", default="off,on")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(**json.loads(args.child))))
        return

    from src.cli.bench_judge import model_spec
    from src.models.llamacpp import engine_gguf
    from src.models.packaged import get_packaged, locate_gguf
    from src.models.store import default_cache_dir

    spec = model_spec(args.model, 1)
    packaged = locate_gguf(spec.package or spec.name)
    print(f"{args.model}: {args.slots} slots x {args.prompt}-token prompts, {args.new} decode steps of all slots; "
          f"the stages' setting: per-slot, flash off, {spec.extra.get('gguf_type') or 'packaged'}")
    print(f"{'weights':>9s} {'layout':>9s} {'flash':>6s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for typ, layout, flash in itertools.product(args.types.split(","), args.layouts.split(","), args.flash.split(",")):
        gguf = packaged if typ == "packaged" else engine_gguf(packaged, typ, default_cache_dir(), get_packaged(spec.package or spec.name).sha256)
        child = {"gguf": str(gguf), "unified": layout == "unified", "flash": flash == "on", "slots": args.slots,
                 "prompt": args.prompt, "new": args.new, "ctx_per_slot": spec.max_model_len}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(child)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{typ:>9s} {layout:>9s} {flash:>6s}   failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{typ:>9s} {layout:>9s} {flash:>6s} {r['prefill_tok_s']:14.0f} {r['decode_tok_s']:13.0f}", flush=True)


if __name__ == "__main__":
    main()
