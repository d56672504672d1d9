"""Generate stage: parsing model output into pairs, dropping what does not parse, and the negatives options."""
import pytest

from src.cache import StageCache
from src.records import Instruction
from src.stages import generate
from src.stages.generate import NegativesConfig, clean_modified, parse_single_call
from tests.conftest import tiny_generator


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Modified instruction: Explain why the sea is salty.", "Explain why the sea is salty."),
        ('"List three prime numbers above 100."', "List three prime numbers above 100."),
        ("**Modified Question:** How do owls hunt?", "How do owls hunt?"),
        ("[User Question Modified]\nWrite a haiku about rain.", "Write a haiku about rain."),
        ("   ", ""),
    ],
)
def test_clean_modified(raw, expected):
    assert clean_modified(raw) == expected


def test_parse_single_call_paper_format():
    text = (
        "[User Question Modified]\nWhat is the capital of Spain?\n\n"
        "[The start of Assistant's answer to the modified instruction]\nMadrid.\n"
        "[The end of Assistant's answer to the modified instruction]"
    )
    assert parse_single_call(text) == ("What is the capital of Spain?", "Madrid.", True)
    # Cut off before the end marker: still parsed, flagged as not ended (counted as a truncated rejected answer).
    assert parse_single_call(text.rsplit("[The end", 1)[0]) == ("What is the capital of Spain?", "Madrid.", False)
    assert parse_single_call("Sure! Here is a modified question: ...") is None


class Recorder:
    """The real tiny model, recording every prompt it is given."""

    def __init__(self, inner):
        self.inner, self.prompts, self.spec = inner, [], inner.spec

    def generate(self, prompts, sampling):
        self.prompts.extend(prompts)
        return self.inner.generate(prompts, sampling)

    def choose(self, *a):
        return self.inner.choose(*a)

    def count_tokens(self, prompts):
        return self.inner.count_tokens(prompts)


tiny = tiny_generator(batch_size=4)


INSTR = [Instruction(f"i{k}", f"Why does ice float on water? Case {k}.", "test", "reasoning", "train") for k in range(3)]


@pytest.mark.parametrize("method, marker", [("modified_instruction", "modified instruction"), ("worse_rewrite", "clearly worse")])
def test_each_negatives_method_uses_its_own_prompt(tiny, tmp_path, method, marker):
    rec = Recorder(tiny)
    cfg = NegativesConfig(method=method, answer_max_new_tokens=6, modify_max_new_tokens=6)
    pairs, stats = generate.run(cfg, INSTR, rec, seed=0, partial=StageCache(tmp_path).partial("generate", method), chunk_size=8)
    assert any(marker in p for p in rec.prompts)
    other = "clearly worse" if method == "modified_instruction" else "modified instruction"
    assert not any(other in p for p in rec.prompts)
    assert stats["pairs"] + sum(stats["dropped"].values()) == len(INSTR)
    assert stats["pairs"] + sum(stats[f"dropped/{r}"] for r in generate.DROP_REASONS) == len(INSTR)
    for p in pairs:
        assert p.chosen and p.rejected and p.chosen != p.rejected
        assert (p.modified != "") == (method == "modified_instruction")


def test_single_call_format_breaks_are_counted_and_logged_as_numbers(tiny, tmp_path):
    """The random tiny model never writes the worse_response markers: every instruction is a format break, and
    every drop reason is a flat number (what the pipeline logs as generate/dropped/<reason>)."""
    cfg = NegativesConfig(mode="single_call", answer_max_new_tokens=6, modify_max_new_tokens=6)
    pairs, stats = generate.run(cfg, INSTR, tiny, seed=0, partial=StageCache(tmp_path).partial("generate", "sc"), chunk_size=8)
    assert pairs == [] and stats["dropped/format_break"] == len(INSTR) and stats["format_break_rate"] == 1.0
    assert all(isinstance(stats[f"dropped/{r}"], int) for r in generate.DROP_REASONS)
    assert stats["truncated/rejected"] == 0  # no rejected answer was parsed out, so none counts as cut off


def test_truncated_answers_are_counted_per_role_and_dropped_on_request(tiny, tmp_path):
    """6 new tokens cut the random model's answers off. drop_truncated=false keeps those pairs and counts them per
    role; drop_truncated=true (same seed, same outputs) drops exactly the pairs with a cut-off side."""
    many = [Instruction(f"t{k}", f"Explain photosynthesis step by step, case {k}.", "test", "reasoning", "train") for k in range(6)]
    keep = NegativesConfig(answer_max_new_tokens=6, modify_max_new_tokens=6)
    kept, s_keep = generate.run(keep, many, tiny, seed=0, partial=StageCache(tmp_path).partial("generate", "keep"), chunk_size=8)
    assert s_keep["truncated/chosen"] > 0  # the test means something: answers were cut
    assert s_keep["truncated/chosen_kept"] + s_keep["truncated/rejected_kept"] > 0 and s_keep["dropped/truncated"] == 0
    drop = NegativesConfig(answer_max_new_tokens=6, modify_max_new_tokens=6, drop_truncated=True)
    left, s_drop = generate.run(drop, many, tiny, seed=0, partial=StageCache(tmp_path).partial("generate", "drop"), chunk_size=8)
    assert s_drop["truncated/chosen_kept"] == s_drop["truncated/rejected_kept"] == 0
    assert s_drop["dropped/truncated"] == len(kept) - len(left) > 0
    assert (s_drop["truncated/chosen"], s_drop["truncated/rejected"]) == (s_keep["truncated/chosen"], s_keep["truncated/rejected"])
