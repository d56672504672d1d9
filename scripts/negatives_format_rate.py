"""Format-break and truncation rates of the two negatives modes on the same instructions.

    python -m scripts.negatives_format_rate [N] [--cache DIR] [hydra overrides...]   (default N=16, the CPU default)

--cache DIR keeps the generate partials there, so a killed measurement resumes where it stopped.

Takes the first N instructions of the CPU default's shuffled pool (no classification: the format is what is
measured, not the category) and runs the generate stage once with negatives.mode=two_step, once with single_call.
"""
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from src.cache import StageCache
from src.models.loading import load_generator
from src.job import Job
from src.records import Instruction
from src.stages import generate
from src.pool import load_pool

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv and argv[0].isdigit() else 16
    cache = argv[argv.index("--cache") + 1] if "--cache" in argv else None
    overrides = [a for a in argv if not a.isdigit() and a != "--cache" and a != cache]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        job = Job.from_config(compose("config", overrides=overrides))
    import random

    pool = load_pool(job.dataset, job.data_root)
    random.Random(job.random_seed).shuffle(pool)
    insts = [Instruction(i, t, w, job.dataset.category, "train") for i, t, w in pool[:n]]
    model = load_generator(job.seed, cache_dir=job.pipeline.model_cache_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("two_step", "single_call"):
            cfg = generate.NegativesConfig(**{**vars(job.negatives), "mode": mode})
            _, st = generate.run(cfg, insts, model, job.random_seed, StageCache(Path(cache or tmp)).partial("generate", mode), 8)
            rows.append((mode, st))
            print(mode, {k: v for k, v in st.items() if "/" in k or k in ("pairs", "format_break_rate")}, flush=True)
    print(f"seed={job.seed.name} instructions={n} answer_max_new_tokens={job.negatives.answer_max_new_tokens} "
          f"modify_max_new_tokens={job.negatives.modify_max_new_tokens}")
    print("| mode | pairs | format breaks | x' = x | other drops | chosen cut off | rejected cut off |")
    print("|---|---|---|---|---|---|---|")
    for mode, st in rows:
        other = sum(v for k, v in st.items() if k.startswith("dropped/") and k not in ("dropped/format_break", "dropped/modified_equals_original"))
        print(f"| {mode} | {st['pairs']}/{n} | {st['dropped/format_break']}/{n} ({st['format_break_rate']:.0%}) | "
              f"{st['dropped/modified_equals_original']} | {other} | {st['truncated/chosen']}/{n} | {st['truncated/rejected']}/{n} |")
    model.close()


if __name__ == "__main__":
    main(sys.argv[1:])
