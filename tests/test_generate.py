"""Generate stage: parsing model output into pairs, dropping what does not parse, and the negatives options."""
import pytest

from src.cache import StageCache
from src.records import Instruction
from src.stages import generate
from src.stages.generate import NegativesConfig, clean_modified, parse_single_call


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
    assert parse_single_call(text) == ("What is the capital of Spain?", "Madrid.")
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


@pytest.fixture(scope="module")
def tiny():
    from src.models.base import ModelSpec
    from src.models.loading import load_generator
    from tests.conftest import model_cache

    gen = load_generator(ModelSpec(name="tiny_random", source="tiny_random", batch_size=4), cache_dir=model_cache())
    yield gen
    gen.close()


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
    for p in pairs:
        assert p.chosen and p.rejected and p.chosen != p.rejected
        assert (p.modified != "") == (method == "modified_instruction")
