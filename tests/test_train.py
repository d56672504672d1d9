"""Training on the tiny model: SFT and DPO really change the adapter; over-long examples are dropped, not cut."""
import pytest
from safetensors.torch import load_file

from src.models.base import ModelSpec
from src.models.loading import load_for_training
from src.records import TrainExample
from src.stages import train
from src.stages.train import TrainConfig
from tests.conftest import model_cache

SPEC = ModelSpec(name="tiny_random", source="tiny_random")
EXAMPLES = [
    TrainExample(f"p{i}", o, f"Which answer is better for question {i}? A: yes. B: no.",
                 f"A answers it. [[{'A' if o == 'chosen_first' else 'B'}]]", "A" if o == "chosen_first" else "B",
                 f"B answers it. [[{'B' if o == 'chosen_first' else 'A'}]]")
    for i in range(4) for o in ("chosen_first", "chosen_second")
]


def lora_weights(path):
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_training_moves_the_adapter_and_lowers_the_loss(tmp_path, method):
    cfg = TrainConfig(method=method, learning_rate=5e-3, num_epochs=3, per_device_batch_size=4, max_length=512, lora_r=4, sft_weight=1.0)
    stats = train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, tmp_path, seed=0, report_to_mlflow=False)
    assert stats["trained"] and stats["examples"] == len(EXAMPLES) and stats["steps"] == 6
    weights = lora_weights(tmp_path)
    # LoRA B matrices start at zero; training must have moved them.
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)
    assert stats["last_loss"] < stats["first_loss"]
    assert not (tmp_path / "checkpoints").exists()  # checkpoints were only for resuming


def test_dpo_skips_examples_without_a_rejected_judgment(tmp_path):
    half = [e if i % 2 else TrainExample(e.pair_id, e.order, e.prompt, e.completion, e.verdict, None) for i, e in enumerate(EXAMPLES)]
    cfg = TrainConfig(method="dpo", num_epochs=1, per_device_batch_size=2, max_length=512, lora_r=4)
    stats = train.run(cfg, half, load_for_training(SPEC, model_cache()), None, tmp_path, seed=0, report_to_mlflow=False)
    assert stats["examples"] == 4


def test_over_long_examples_are_dropped_and_previous_adapter_continues(tmp_path):
    long = TrainExample("x", "chosen_first", "word " * 2000, "[[A]]", "A")
    first = tmp_path / "first"
    stats = train.run(TrainConfig(max_length=512, lora_r=4, per_device_batch_size=4), EXAMPLES + [long],
                      load_for_training(SPEC, model_cache()), None, first, seed=0, report_to_mlflow=False)
    assert stats["dropped_too_long"] == 1 and stats["examples"] == len(EXAMPLES)
    # init_from=previous: the next iteration trains the previous adapter further.
    second = tmp_path / "second"
    train.run(TrainConfig(max_length=512, lora_r=4, per_device_batch_size=4, learning_rate=5e-3), EXAMPLES,
              load_for_training(SPEC, model_cache()), first / "adapter", second, seed=0, report_to_mlflow=False)
    a, b = lora_weights(first), lora_weights(second)
    assert a.keys() == b.keys() and any(float((a[k] - b[k]).abs().sum()) > 0 for k in a)
