"""Prompts per role and headline metrics under each benchmark's official rule.

Hand-written judgment texts go through the same scoring functions the evaluate stage uses; the tiny-model runs
check that what is logged is the official scoring of the logged judgment texts (the random model writes no tags,
so its headline is the verdict-less 0.5 while its constrained reading is not)."""
from __future__ import annotations

import json

import pytest

from src.benchmarks import mtbench as mt
from src.benchmarks import rewardbench as rb
from src.prompts import Template, load_template
from src.records import EvalItem
from src.stages import evaluate
from src.stages.evaluate import EvalConfig, MTBenchConfig, RewardBenchConfig
from src.judging import fit_prompts, judge_template, render, token_budget
from src.rules.verdicts import fastchat_verdict, parse_verdict, rewardbench_verdict
from tests.conftest import DATA_ROOT, REPO, model_cache, only_run, standalone_eval, tiny_generator

# (text, RewardBench process_judgement, FastChat per-order verdict, the paper's rule)
TEXTS = [
    ("Both answers are fine; hard to say.", None, None, None),
    ("Assistant A is correct. [[A]]", "A", "A", "A"),
    ("Assistant B is correct. [[B]]", "B", "B", "B"),
    ("First [[B]], on reflection [[A]]", "A", "A", None),  # both tags: official parsers check A first
    ("[[C]]", None, "tie", None),
]


@pytest.mark.parametrize("text,rb_v,fc_v,paper_v", TEXTS)
def test_parsers_on_hand_written_texts(text, rb_v, fc_v, paper_v):
    assert rewardbench_verdict(text) == rb_v
    assert fastchat_verdict(text) == fc_v
    assert parse_verdict(text) == paper_v


def _rb_item(text, subset, order, constrained=None):
    label = "A" if order == "chosen_first" else "B"
    extra = {"subset": subset, "section": rb.SUBSET_TO_SECTION[subset], "id": 1, "text": text}
    if constrained:
        extra["constrained"] = constrained
    v = rewardbench_verdict(text)
    return EvalItem("rewardbench", f"{subset}/1", order, v, "parsed" if v else None, label, extra)


def test_rewardbench_official_score_of_hand_written_texts():
    """chosen is A (chosen_first): verdict-less 0.5, [[A]] 1, [[B]] 0, both tags 1 (counts as A), [[C]] 0.5."""
    subsets = ["alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "hep-cpp", "hep-go"]
    items = [_rb_item(t, s, "chosen_first", constrained="A" if rb_v is None else None) for (t, rb_v, _, _), s in zip(TEXTS, subsets)]
    m = evaluate.rewardbench_score(items, EvalConfig())
    assert m["rewardbench/chat"] == 0.5 and m["rewardbench/chat_hard"] == 1.0 and m["rewardbench/safety"] == 0.0
    assert m["rewardbench/reasoning"] == 0.75  # hep-cpp 1 (both tags), hep-go 0.5 ([[C]]), equal weights
    assert m["rewardbench/overall"] == pytest.approx((0.5 + 1 + 0 + 0.75) / 4)
    assert m["rewardbench/parse_fail"] == pytest.approx(2 / 5)
    # the constrained reading fills the two verdict-less texts with A (= chosen): its own names, never the headline
    assert m["rewardbench/constrained/chat"] == 1.0 and m["rewardbench/constrained/reasoning"] == 1.0
    assert m["rewardbench/constrained/overall"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert m["rewardbench/constrained/parse_fail"] == 0.0


def test_mtbench_fastchat_score_of_hand_written_texts():
    """Per key, the two orders' texts -> FastChat vote -> agreement with one expert vote each."""
    def item(qid, order, text):
        return EvalItem("mtbench", f"{qid}", order, fastchat_verdict(text), None, "",
                        {"question_id": qid, "model_a": "a", "model_b": "b", "turn": 1, "text": text,
                         "human_votes": [{"judge": "expert_1", "winner": human[qid]}]})

    human = {1: "model_a", 2: "model_a", 3: "tie", 4: "tie", 5: "model_b", 6: "model_a"}
    pairs = {  # (ab text, ba text) -> FastChat vote
        1: ("[[A]]", "[[B]]"),          # model_a both orders -> model_a: agrees
        2: ("[[A]] and [[B]]", "[[B]]"),  # both tags read as A -> model_a: agrees
        3: ("[[C]]", "[[C]]"),          # tie both -> tie: agrees with a human tie (S1), dropped in S2
        4: ("[[A]]", "[[A]]"),          # inconsistent -> "tie (inconsistent)": agrees with a tie in S1
        5: ("no verdict", "none"),      # error + error -> "error": agrees with nobody, kept in S2
        6: ("no verdict", "[[B]]"),     # error + model_a -> inconsistent tie: disagrees with model_a
    }
    items = [item(q, o, t) for q, (ab, ba) in pairs.items() for o, t in (("ab", ab), ("ba", ba))]
    m = evaluate.mtbench_score(items, EvalConfig())
    assert m["mtbench/agreement_s1"] == pytest.approx(4 / 6)  # keys 1, 2, 3, 4
    assert m["mtbench/n_s2"] == 3 and m["mtbench/agreement_s2"] == pytest.approx(2 / 3)  # keys 1, 2, 5
    assert m["mtbench/parse_fail"] == pytest.approx(3 / 12)
    assert m["mtbench/judge_error_rate"] == pytest.approx(1 / 6)
    assert not any("/constrained/" in k for k in m)  # no constrained choices were made


def test_render_fills_placeholders_in_one_pass():
    t = Template("Q: {input}\nA: {generation}\nB: {generation2}", "t", ("input", "generation", "generation2"))
    out = t.render(input="x {generation2}", generation="code {generation} {input}", generation2="{generation}")
    assert out == "Q: x {generation2}\nA: code {generation} {input}\nB: {generation}"
    assert t.render(input="{a}", generation="}{", generation2="") == "Q: {a}\nA: }{\nB: "


def test_one_template_file_per_role_verbatim():
    """Training judgments: the paper's eval_plan, byte for byte; evaluation: RAM's SELF_TAUGHT_WITH_SYSTEM_PROMPT."""
    release = json.loads((DATA_ROOT / "selftaught_evaluator_release" / "prompt_templates.json").read_text())
    train = judge_template(None, "judging.prompt")
    assert train.text == release["eval_plan"] and train.system is None and "evaluaiton rubric" in train.text
    ev = judge_template(None, "eval.prompt")
    assert ev.system.startswith("Please act as an impartial judge") and ev.system.endswith('\\"[[B]]\\" if assistant B is better.')
    # RAM's user turn, str.format'ed with its own placeholder names, equals ours
    ram_user = ev.text.replace("{generation2}", "{response_b}").replace("{generation}", "{response_a}")
    assert ev.fill(input="Q", generation="a1", generation2="b1") == ram_user.format(input="Q", response_a="a1", response_b="b1")
    assert render(ev, "Q", "a1", "b1", 100) == [{"role": "system", "content": ev.system},
                                                 {"role": "user", "content": ev.fill(input="Q", generation="a1", generation2="b1")}]
    # the same file loads through the config path, and a system prompt is refused for training judgments
    same = load_template(str(REPO / "src" / "prompts" / "self_taught_eval.json"), "x", ("input",), "eval.prompt")
    assert (same.system, same.text) == (ev.system, ev.text)
    from src.config import ConfigError

    with pytest.raises(ConfigError, match="system message"):
        judge_template(str(REPO / "src" / "prompts" / "self_taught_eval.json"), "judging.prompt")


def test_lm_eval_task_renders_the_loops_prompt():
    """lm-eval's own prompt assembly (task description = system turn, doc_to_text = user turn) gives the messages
    the loop's evaluate stage (and the standalone scorer, which calls it) renders for the same item and order."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(REPO / "lm_eval_tasks")).load(["rewardbench_judge", "mtbench_human_judge"])["tasks"]
    template = judge_template(None, "eval.prompt")
    loop = {
        "rewardbench_judge": {(p.extra["subset"], p.extra["id"], p.order): p.parts
                              for p in evaluate.rewardbench_items(EvalConfig(rewardbench=RewardBenchConfig(per_subset=1, orders="both")), str(DATA_ROOT))},
        "mtbench_human_judge": {(p.extra["question_id"], p.extra["model_a"], p.extra["model_b"], p.extra["turn"], p.order): p.parts
                                for p in evaluate.mtbench_items(EvalConfig(mtbench=MTBenchConfig(max_keys=4)), str(DATA_ROOT))},
    }
    keys = {"rewardbench_judge": lambda d: (d["subset"], d["id"], d["order"]),
            "mtbench_human_judge": lambda d: (d["question_id"], d["model_a"], d["model_b"], d["turn"], d["order"])}
    for name, parts_by_key in loop.items():
        task = tasks[name]
        docs = [d for d in task.test_docs() if keys[name](d) in parts_by_key][:6]
        assert len(docs) >= 4, name
        for doc in docs:
            messages = task.fewshot_context(doc, 0, apply_chat_template=True, chat_template=lambda m, **kw: m)
            x, a, b = parts_by_key[keys[name](doc)]
            assert messages == render(template, x, a, b, 10**9), name


# ------------------------------------------------------------------------------------------ tiny model
tiny = tiny_generator(batch_size=8, max_model_len=1024)


def test_generator_sends_the_system_message(tiny):
    """A system + user prompt goes through the model's chat template as two turns (counted the same way)."""
    template = judge_template(None, "eval.prompt")
    messages = render(template, "Q", "a1", "b1", 100)
    text = tiny.chat_text(messages)
    assert tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert text.index(template.system) < text.index("[User Question]\nQ")
    assert "<|system|>" in text and "<|system|>" not in tiny.chat_text(messages[1]["content"])
    assert tiny.count_tokens([messages]) == [len(tiny._encode(text))]


def test_long_inputs_are_clipped_to_the_token_budget(tiny):
    """No stage aborts on a long pair: the responses are cut until prompt + max_new_tokens fits the context."""
    template = judge_template(None, "eval.prompt")
    budget = token_budget(tiny, 64, "constrained")
    parts = [("short question", "short a", "short b"), ("q " * 3000, "a" * 16000, "b" * 300)]
    (p0, c0), (p1, c1) = fit_prompts(template, parts, 16000, tiny, budget)
    assert c0 is None and p0 == render(template, *parts[0], 16000)
    n = tiny.count_tokens([p1])[0]
    assert c1 is not None and n <= budget and n > budget * 0.7  # cut, but not to nothing
    assert p1 == render(template, *parts[1], c1)  # the limit reproduces the prompt (training examples rely on it)
    with pytest.raises(ValueError, match="even with one character of its input shown"):
        fit_prompts(template, parts[:1], 16000, tiny, 50)
    tiny.generate([p1], evaluate.SamplingConfig(max_new_tokens=4))  # within the model's own length check


def test_tiny_run_headline_is_the_official_scoring_of_its_texts(tiny, tmp_path):
    from src.cache import StageCache

    cfg = EvalConfig(max_new_tokens=6, max_response_chars=150, verdict="constrained",
                     rewardbench=RewardBenchConfig(per_subset=1, orders="both"), mtbench=MTBenchConfig(max_keys=4))
    items, m = evaluate.run("rewardbench", cfg, [], str(DATA_ROOT), tiny, StageCache(tmp_path).partial("rewardbench", "k"), 16)
    records = [{"subset": i.extra["subset"], "id": i.extra["id"], "order": i.order, "chosen_label": i.chosen_label,
                "verdict": rewardbench_verdict(i.extra["text"])} for i in items]
    official = rb.rewardbench_metrics(records)
    for k in ("overall", "chat", "chat_hard", "safety", "reasoning", "parse_fail"):
        assert m[f"rewardbench/{k}"] == official[f"rewardbench/{k}"], k
    assert "rewardbench/constrained/overall" in m
    assert m["rewardbench/clipped"] > 0  # RewardBench responses are longer than 150 characters

    items, m = evaluate.run("mtbench", cfg, [], str(DATA_ROOT), tiny, StageCache(tmp_path).partial("mtbench", "k"), 16)
    meta = ("question_id", "model_a", "model_b", "turn")
    records = [{**{k: i.extra[k] for k in meta}, "order": i.order, "verdict": fastchat_verdict(i.extra["text"])} for i in items]
    humans = mt.human_rows_from_keyed({**{k: i.extra[k] for k in meta}, "human_votes": i.extra["human_votes"]} for i in items if i.order == "ab")
    official = mt.mtbench_metrics(records, humans)
    for k in [k for k in official if k.startswith("mtbench/agreement")] + ["mtbench/parse_fail"]:
        assert m[k] == official[k], k
    assert "mtbench/agreement_s1" in m and "mtbench/constrained/agreement_s1" in m


@pytest.mark.parametrize("preset", ["cpu", "full"])
def test_every_eval_preset_logs_majority_vote_to_mlflow(tmp_path, preset, monkeypatch):
    """Each eval preset once with MLflow on (SQLite store under tmp_path) and maj_k=2: the run finishes and the
    majority-vote metrics, named in MLflow's alphabet, are logged; the prompt is logged as a param."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded, so teardown restores the variable's absence...
    monkeypatch.delenv("MLFLOW_TRACKING_URI")      # ...after only_run's mlflow.set_tracking_uri exports it again
    standalone_eval(tmp_path, ["model=tiny_random", f"eval={preset}", "tracking=mlflow", "eval.max_new_tokens=4",
                               "eval.max_response_chars=150", "eval.rewardbench.per_subset=1", "eval.rewardbench.maj_k=2",
                               "eval.mtbench.max_keys=2", f"pipeline.model_cache_dir={model_cache()}"])
    _, run = only_run(tmp_path, "eval")
    assert run.info.status == "FINISHED"
    logged = run.data.metrics
    assert {"rewardbench/overall_maj2", "rewardbench/chat_hard_maj2", "rewardbench/parse_fail_maj2"} <= set(logged)
    assert logged["rewardbench/maj_k"] == 2 and 0.0 <= logged["rewardbench/overall_maj2"] <= 1.0
    assert ("rewardbench/constrained/overall_maj2" in logged) == (preset == "cpu")  # full: official rule only
    assert run.data.params["prompt.eval"].startswith("self_taught_eval.json@")


def test_single_call_negatives_template_is_rams_worse_response_byte_for_byte():
    """RAM's worse_response prompt, as the paper's single-call negatives use it. Its first line ends
    "AI Assistant. " with a trailing space (an editor's whitespace cleanup once dropped it)."""
    from src.stages.generate import NegativesConfig, templates

    release = json.loads((DATA_ROOT / "selftaught_evaluator_release" / "prompt_templates.json").read_text())
    t = templates(NegativesConfig(mode="single_call"))["single_call"]
    assert t.text == release["worse_response"]
    assert t.text.splitlines()[0].endswith("AI Assistant. ")
    assert (REPO / "src" / "prompts" / "worse_response.txt").read_bytes() == release["worse_response"].encode()
