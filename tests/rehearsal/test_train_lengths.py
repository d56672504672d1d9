"""Rehearsal (issue 16, §2): a GPU preset's train stage admits the examples its judge stage writes. A training
example is the judge prompt plus one judgment; the train stage drops (never truncates) longer ones, so a
max_length below prompt + judgment silently trains on almost nothing."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF

# The paper's judge prompt: RAM's eval_plan template (~330 tokens) + an instruction + two answers; ~1.4k tokens is
# a typical WildChat reasoning pair (the review's measurement), far from the worst case.
TYPICAL_PROMPT_TOKENS = 1400


@pytest.mark.parametrize("preset", ["gpu_small", "paper"])
def test_gpu_preset_trains_on_a_typical_judgment(preset):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiments={preset}"])
    assert cfg.train.max_length >= TYPICAL_PROMPT_TOKENS + cfg.judging.max_new_tokens
    assert cfg.train.max_length <= cfg.judge.max_model_len  # the model's own context bounds what it can learn
