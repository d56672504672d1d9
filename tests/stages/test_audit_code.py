"""The unit-test audit of code pools (`audit=execute`) on real HumanEval / MBPP rows.

What runs here is human-written code only: the datasets' canonical solutions and small hand-written variants of
them. Model-written code runs only in the opt-in test at the end (STE_TEST_EXECUTE=1), as the issue requires."""
import gzip
import json
import os

import pytest

from src.rules.audit import code_program, extract_code, humaneval_program, mbpp_program
from src.records import Instruction, Pair
from src.sandbox import SandboxConfig, run
from tests.conftest import DATA_ROOT, TINY, only_run

HE = [json.loads(l) for l in gzip.open(DATA_ROOT / "code/HumanEval.jsonl.gz", "rt")]
MBPP = [json.loads(l) for l in open(DATA_ROOT / "code/mbpp.jsonl")]
LIMITS = SandboxConfig(timeout_s=10)
NO_DATASET = [o for o in TINY if not o.startswith("dataset")]


def passes(row, response):
    return run(code_program(row, response), LIMITS).status == "passed"


def test_extract_code_prefers_the_fenced_block_that_defines_the_function():
    text = "Usage:\n```python\nprint(f(1))\n```\nHere it is:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(text, "f") == "def f(x):\n    return x\n"
    assert extract_code("```\ndef g():\n    pass\n```", "f") == "def g():\n    pass\n"  # else the first that defines one
    assert extract_code("```python\ndef f(x):\n    return x +") == "def f(x):\n    return x +"  # cut off: open fence
    assert extract_code("def f(x): return x") == "def f(x): return x"  # no fence: the text
    assert extract_code("```bash\nrm -rf /\n```") == "```bash\nrm -rf /\n```"  # only python/unlabelled blocks count


def test_humaneval_programs_complete_the_prompt_whatever_form_the_response_takes():
    """The canonical solution as a body (indented, as in the dataset, or flush left as a model may write it), and as
    a whole function in a fence with prose around it, all pass; the prompt's imports and helper functions stay."""
    row = HE[0]
    body = row["canonical_solution"]
    flush = "\n".join(line[4:] for line in body.splitlines())
    whole = "Sure:\n```python\ndef has_close_elements(numbers, threshold):\n" + body + "```\nThis loops twice."
    for response in (body, flush, whole):
        program = humaneval_program(row["prompt"], row["entry_point"], row["test"], response)
        assert program.startswith("from typing import List") and program.rstrip().endswith("check(has_close_elements)")
        assert run(program, LIMITS).status == "passed", response
    helper = next(r for r in HE if r["task_id"] == "HumanEval/10")  # the prompt defines is_palindrome first
    whole = "```python\ndef make_palindrome(string: str) -> str:\n" + helper["canonical_solution"] + "```"
    assert "def is_palindrome" in humaneval_program(helper["prompt"], helper["entry_point"], helper["test"], whole)
    assert passes(helper, whole)


def test_canonical_solutions_pass_and_another_problems_fail():
    for i in (0, 7, 33, 81, 140):
        assert passes(HE[i], HE[i]["canonical_solution"]), HE[i]["task_id"]
        assert not passes(HE[i], HE[i + 1]["canonical_solution"]), HE[i]["task_id"]
    for i in (0, 100, 366, 500):  # 366: task 367, with test_setup_code (a tree built before the asserts)
        assert passes(MBPP[i], MBPP[i]["code"]), MBPP[i]["task_id"]
        assert not passes(MBPP[i], MBPP[i + 1]["code"]), MBPP[i]["task_id"]
    assert MBPP[366]["test_setup_code"]


def test_mbpp_binds_a_differently_named_function_to_the_tested_name():
    """MBPP's instruction does not name the function: a right answer under another name passes, a wrong one fails."""
    row = MBPP[0]  # min_cost(cost, m, n)
    renamed = row["code"].replace("def min_cost(", "def minimum_cost_path(")
    program = mbpp_program(row["test_list"], row["test_setup_code"], renamed)
    assert "min_cost = minimum_cost_path" in program
    assert run(program, LIMITS).status == "passed"
    assert not passes(row, "def minimum_cost_path(cost, m, n):\n    return 0\n")
    assert "min_cost = " not in mbpp_program(row["test_list"], "", row["code"])  # the right name: nothing bound


def pair(pid, chosen, rejected, split="train"):
    return Pair(id=pid, instruction="-", chosen=chosen, rejected=rejected, modified="-", split=split)


def test_the_audit_stage_reads_the_pool_tests_and_fills_the_four_cells(make_cfg):
    """`stages.audit.run` under audit=execute on the code_prompts pool: pairs from canonical solutions (chosen its
    own, rejected another problem's: clean), one swapped (inverted), one with both right; a pair whose id is not in
    the pool is not audited. Same `audit/*` names as the answer audit."""
    from src.job import Job
    from src.stages import audit

    job = Job.from_config(make_cfg(*NO_DATASET, "dataset=code_prompts", "audit=execute"))
    he = {r["task_id"]: r for r in HE}
    mb = {str(r["task_id"]): r for r in MBPP}
    pairs = [pair(t, he[t]["canonical_solution"], HE[i + 1]["canonical_solution"]) for i, t in ((0, "HumanEval/0"), (7, "HumanEval/7"))]
    pairs += [pair(t, mb[t]["code"], mb[n]["code"], "heldout") for t, n in (("11", "12"), ("20", "21"))]
    pairs.append(pair("HumanEval/33", he["HumanEval/34"]["canonical_solution"], he["HumanEval/33"]["canonical_solution"]))
    pairs.append(pair("30", mb["30"]["code"], mb["30"]["code"].replace("\r\n", "\n")))
    pairs.append(pair("not-in-pool", "x", "y"))
    instructions = [Instruction(id=p.id, text="-", source="-", category="code", split=p.split) for p in pairs]
    rows, stats = audit.run(job.audit, job.dataset, job.data_root, instructions, pairs)
    assert [r["outcome"] for r in rows] == ["clean"] * 4 + ["inverted", "both_right"]
    assert stats["audit/pairs"] == stats["audit/executed_pairs"] == 6
    assert stats["audit/clean"] == 4 / 6 and stats["audit/inverted"] == 1 / 6 and stats["audit/both_right"] == 1 / 6
    assert stats["audit/chosen_wrong"] == 1 / 6 and stats["audit/rejected_right"] == 2 / 6
    assert stats["audit/exec/passed"] == 7 / 12 and stats["audit/exec/passed"] + stats["audit/exec/failed"] + stats["audit/exec/error"] + stats["audit/exec/timeout"] == 1
    assert rows[0]["rejected_status"] == "failed" and "Error" in rows[0]["rejected_stderr"]

    # without execute, the same pairs of a pool with no reference answers are not audited (no code runs)
    default = Job.from_config(make_cfg(*NO_DATASET, "dataset=code_prompts"))
    assert audit.run(default.audit, default.dataset, default.data_root, instructions, pairs) == ([], {"audit/pairs": 0.0})


def test_plan_adds_the_audit_steps_only_when_asked_and_keys_what_shapes_them(make_cfg):
    """Default: no audit on a pool without references, the same key as before the group on GSM8K. execute: an
    audit step on code pools, keyed by the sandbox limits. judge: an audit_judge step keyed by the audit model."""
    from src.cache import make_key
    from src.job import Job
    from src.plan import plan

    def steps(*o):
        return {s.stage: s for s in plan(Job.from_config(make_cfg(*NO_DATASET, *o)))}

    code, gsm = ["dataset=code_prompts"], ["dataset=gsm8k"]
    assert "audit" not in steps(*code) and "audit_judge" not in steps(*code)
    g = steps(*gsm)
    assert g["audit"].key == make_key("audit", 2, {}, {"pairs": g["generate"].key})  # the pre-group formula, VERSION 2 (answer normalisation)
    ex = steps(*code, "audit=execute")
    assert ex["audit"].key != steps(*code, "audit=execute", "audit.sandbox.timeout_s=3")["audit"].key
    assert steps(*gsm, "audit=execute")["audit"].key != g["audit"].key
    j = steps(*code, "audit=judge", "model@audit.model=tiny_random")
    assert j["audit_judge"].model == "tiny_random" and j["audit_judge"].inputs == {"pairs": ("generate", j["generate"].key)}
    assert j["audit_judge"].key != steps(*code, "audit=judge", "model@audit.model=smollm2_135m")["audit_judge"].key
    assert j["audit_judge"].key != steps(*code, "audit=judge", "model@audit.model=tiny_random", "audit.k=2")["audit_judge"].key
    # what does not shape the votes (the sandbox) does not move the judge's key; the other stages' keys never move
    assert j["audit_judge"].key == steps(*code, "audit=judge", "model@audit.model=tiny_random", "audit.sandbox.cpu_s=3")["audit_judge"].key
    base = steps(*code)
    assert all(j[s].key == base[s].key for s in base)


def test_bad_audit_config_fails_with_one_line_naming_the_key(make_cfg):
    from src.config import ConfigError
    from src.job import Job, preflight

    with pytest.raises(ConfigError, match=r"audit.judge=true needs audit.model"):
        Job.from_config(make_cfg(*TINY, "audit.judge=true"))
    with pytest.raises(ConfigError, match=r"audit.sandbox.network='none'"):
        Job.from_config(make_cfg(*TINY, "audit=execute", "audit.sandbox.network=none"))
    with pytest.raises(ConfigError, match=r"audit.k=3 with audit.temperature=0"):
        Job.from_config(make_cfg(*TINY, "audit=judge", "audit.temperature=0"))
    with pytest.raises(ConfigError, match=r"audit=execute: dataset=reasoning has neither unit tests"):
        preflight(Job.from_config(make_cfg(*TINY, "audit=execute")))


@pytest.mark.skipif(os.environ.get("STE_TEST_EXECUTE") != "1",
                    reason="executes model-written code (the tiny model's responses): opt-in, STE_TEST_EXECUTE=1")
def test_tiny_run_with_audit_execute_on_code_prompts_logs_audit_metrics(tmp_path):
    """The real CLI, tiny random model, MLflow on, `audit=execute` on `dataset=code_prompts`: every pair's chosen and
    rejected response is run against its problem's unit tests in the sandbox; the shares are logged at step 0."""
    from tests.e2e.test_cli_e2e import cli

    overrides = [o for o in TINY if not o.startswith(("dataset", "tracking=", "iterations=", "eval.mtbench"))]
    cli(tmp_path, *overrides, "dataset=code_prompts", "dataset.limit=4", "dataset.max_scan=8", "audit=execute",
        "iterations=0", "eval.mtbench.enabled=false")
    client, r = only_run(tmp_path)
    m = r.data.metrics
    assert r.info.status == "FINISHED"
    assert m["audit/pairs"] == m["audit/executed_pairs"] == m["generate/pairs"] >= 1
    cells = ["audit/inverted", "audit/clean", "audit/both_right", "audit/neither_right"]
    assert abs(sum(m[c] for c in cells) - 1) < 1e-9
    rows = [json.loads(l) for l in open(client.download_artifacts(r.info.run_id, "data/audit_iter0/data.jsonl", str(tmp_path)))]
    assert len(rows) == m["audit/pairs"] and all(row["chosen_status"] in ("passed", "failed", "timeout", "error") for row in rows)
