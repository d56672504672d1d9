"""lm-eval runs the repo's judge tasks offline on a tiny random-weights Llama, and the bridge turns the logged
samples into the official metric dicts (matching lm-eval's own aggregates)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from src.benchmarks import lmeval_bridge  # noqa: E402
from tests.conftest import REPO

DATA = REPO.parent / "shared" / "data"
LIMIT = 8  # docs per task = 4 items x 2 orders

pytestmark = pytest.mark.skipif(
    not (DATA / "rewardbench" / "filtered.jsonl.gz").exists()
    or not (DATA / "mtbench" / "human_judgments.jsonl.gz").exists()
    or not (DATA / "selftaught_evaluator_release" / "prompt_templates.json").exists(),
    reason="shared data not present",
)


def _build_tiny_model(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        "Please act as an impartial judge and evaluate the quality of the responses. [[A]] [[B]]",
        "[The Start of Assistant A's Answer] def f(x): return x + 1 [The End of Assistant A's Answer]",
        "[User Question] What is 2 + 2? The answer is 4.",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_tokens(["[[A]]", "[[B]]"])  # ordinary tokens, so a random model emits verdicts now and then
    fast.model_max_length = 256
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)


@pytest.fixture(scope="module")
def lmeval_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    model_dir = root / "model"
    _build_tiny_model(model_dir)
    out = root / "out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32",
        "--tasks", "rewardbench_judge", "mtbench_human_judge",
        "--include_path", "lm_eval_tasks", "--limit", str(LIMIT), "--device", "cpu", "--batch_size", "8",
        "--gen_kwargs", "max_gen_toks=4", "--output_path", str(out), "--log_samples",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = out.rglob("results_*.json")
    return out, json.loads(results_file.read_text())["results"]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def test_rewardbench_metrics_from_lmeval_samples(lmeval_run):
    out, results = lmeval_run
    files = lmeval_bridge.find_samples_files(out)
    assert set(files) == {"rewardbench_judge", "mtbench_human_judge"}
    m = lmeval_bridge.rewardbench_metrics_from_samples(out)
    for k in ("overall", "chat", "chat_hard", "safety", "reasoning", "swap_consistency", "parse_fail"):
        assert 0.0 <= m[f"rewardbench/{k}"] <= 1.0, k
    for sec in ("chat", "chat_hard", "safety", "reasoning"):
        assert 0.0 <= m[f"rewardbench/parse_fail/{sec}"] <= 1.0
        assert 0.0 <= m[f"rewardbench/swap_consistency/{sec}"] <= 1.0
    # the prefix of the interleaved doc order: 4 items, one per section, each in both orders
    assert m["rewardbench/n_records"] == LIMIT and m["rewardbench/n_items"] == LIMIT // 2
    assert m["rewardbench/sections_missing"] == 0
    assert not any("_maj" in k for k in m)  # greedy, repeats 1
    # every score is a multiple of 1/4 (per-order scores 0 / 0.5 / 1, two orders per item)
    assert (m["rewardbench/overall"] * 16) == pytest.approx(round(m["rewardbench/overall"] * 16))
    # lm-eval's own aggregate is the same official number
    res = results["rewardbench_judge"]
    assert res["rewardbench_overall,all"] == pytest.approx(m["rewardbench/overall"])
    assert res["parse_fail,all"] == pytest.approx(m["rewardbench/parse_fail"])
    assert 0.0 <= res["acc,all"] <= 1.0


def test_rewardbench_samples_carry_records_consistent_with_outputs(lmeval_run):
    out, _ = lmeval_run
    spec = importlib.util.spec_from_file_location("ste_lm_eval_task_utils", REPO / "lm_eval_tasks" / "utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)
    samples = lmeval_bridge.read_samples(lmeval_bridge.find_samples_files(out)["rewardbench_judge"])
    assert len(samples) == LIMIT
    recs = lmeval_bridge.records_from_samples(samples, lmeval_bridge.REWARDBENCH_FIELD)
    for s, r in zip(samples, recs):
        assert r["verdict"] == task_utils.rewardbench_verdict(s["filtered_resps"][0][0])  # the official parser
        assert r["subset"] == s["doc"]["subset"] and r["order"] == s["doc"]["order"]
        assert r["chosen_label"] == ("A" if r["order"] == "chosen_first" else "B")
    assert [r["order"] for r in recs[:2]] == ["chosen_first", "chosen_second"]
    assert (recs[0]["subset"], recs[0]["id"]) == (recs[1]["subset"], recs[1]["id"])
    assert len({r["section"] for r in recs}) == 4


def test_mtbench_metrics_from_lmeval_samples(lmeval_run):
    out, results = lmeval_run
    m = lmeval_bridge.mtbench_metrics_from_samples(out)
    assert m["mtbench/n_records"] == LIMIT and m["mtbench/n_keys"] == LIMIT // 2
    assert 0.0 <= m["mtbench/parse_fail"] <= 1.0 and 0.0 <= m["mtbench/swap_consistency"] <= 1.0
    assert m["mtbench/n_s1"] >= m["mtbench/n_s2"] >= 0
    assert m["mtbench/n_s1"] == m["mtbench/n_s1/turn1"] + m["mtbench/n_s1/turn2"] > 0
    for k, v in m.items():
        if k.startswith("mtbench/agreement"):
            assert 0.0 <= v <= 1.0, k
    assert m["mtbench/n_s1/turn1"] > 0 and m["mtbench/n_s1/turn2"] > 0  # both turns in the prefix
    res = results["mtbench_human_judge"]
    assert _same(res["agreement_s1,all"], m["mtbench/agreement_s1"])
    assert _same(res["agreement_s2,all"], m.get("mtbench/agreement_s2", math.nan))
    # the merged dict has both benchmarks
    merged = lmeval_bridge.metrics_from_lmeval_output(out)
    assert "rewardbench/overall" in merged and "mtbench/agreement_s1" in merged


def test_task_docs_cover_full_data():
    import datasets

    spec = importlib.util.spec_from_file_location("ste_lm_eval_task_utils2", REPO / "lm_eval_tasks" / "utils.py")
    u = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(u)
    rb = datasets.Dataset.from_json(str(DATA / "rewardbench" / "filtered.jsonl.gz"))
    docs = u.rewardbench_process_docs(rb)
    assert len(docs) == 2 * 2985
    assert len({(d["subset"], d["id"], d["order"]) for d in docs}) == 2 * 2985
    text = u.doc_to_text(docs[1])  # the user turn; the verdict format is in the system turn
    assert docs[1]["answer_a"] in text and docs[1]["answer_b"] in text and "[[A]]" in docs[1]["judge_system"]
    mt_rows = datasets.Dataset.from_json(str(DATA / "mtbench" / "human_judgments.jsonl.gz"))
    mdocs = u.mtbench_process_docs(mt_rows)
    assert len(mdocs) == 2 * 1633  # keys with an expert vote, both orders
    assert [d["order"] for d in mdocs.select(range(4))] == ["ab", "ba", "ab", "ba"]
    assert [d["turn"] for d in mdocs.select(range(4))] == [1, 1, 2, 2]
    assert u.rewardbench_verdict("so [[B]]") == "B" and u.rewardbench_verdict("[[A]] or [[B]]") == "A"  # official
    assert u.fastchat_verdict("[[C]]") == "tie" and u.rewardbench_verdict("[[C]]") is None
