"""Benchmark evaluation on the tiny model: majority vote @k through the evaluate stage, and the standalone CLI."""


from src.cache import StageCache
from src.stages import evaluate
from src.stages.evaluate import EvalConfig, RewardBenchConfig
from tests.conftest import DATA_ROOT, model_cache, only_run, standalone_eval, tiny_generator


tiny = tiny_generator(batch_size=8)


def test_rewardbench_majority_vote_at_k(tiny, tmp_path):
    cfg = EvalConfig(max_new_tokens=4, max_response_chars=150, rewardbench=RewardBenchConfig(per_subset=1, orders="one", maj_k=3))
    items, metrics = evaluate.run("rewardbench", cfg, [], str(DATA_ROOT), tiny, StageCache(tmp_path).partial("rewardbench", "k"), 16)
    assert len(items) == 23  # one item per subset, one order each
    assert all(len(i.extra["verdicts_k"]) == 3 for i in items)
    assert 0.0 <= metrics["rewardbench/overall_maj3"] <= 1.0 and metrics["rewardbench/maj_k"] == 3
    assert metrics["rewardbench/n_items"] == 23 and metrics["rewardbench/sections_missing"] == 0


def test_standalone_evaluate_cli_logs_an_eval_run(tmp_path):
    args = ["model=tiny_random", "eval.max_new_tokens=4", "eval.max_response_chars=150", "eval.rewardbench.per_subset=1",
            "eval.mtbench.max_keys=2", f"pipeline.model_cache_dir={model_cache()}"]
    standalone_eval(tmp_path, args)
    _, run = only_run(tmp_path, "eval")
    assert run.info.status == "FINISHED"
    assert {"rewardbench/overall", "rewardbench/chat_hard", "mtbench/agreement_s1"} <= set(run.data.metrics)
    # A second call is served from the cache, by the loop's Runner, without loading the model.
    again = standalone_eval(tmp_path, args)
    out = again.stdout + again.stderr
    assert "rewardbench[iter 0]: cached" in out and "mtbench[iter 0]: cached" in out
    assert "model: loaded" not in out
