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
    assert stats["produced"] == "adapter" and not (tmp_path / "model").exists()
    weights = lora_weights(tmp_path)
    # LoRA B matrices start at zero; training must have moved them.
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)
    assert stats["last_loss"] < stats["first_loss"]
    assert not (tmp_path / "checkpoints").exists()  # checkpoints were only for resuming


def test_dpo_skips_examples_without_a_rejected_judgment(tmp_path):
    half = [e if (i // 2) % 2 else TrainExample(e.pair_id, e.order, e.prompt, e.completion, e.verdict, None) for i, e in enumerate(EXAMPLES)]
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


def test_full_fine_tuning_changes_every_weight_and_loads_as_the_judge(tmp_path):
    """train.peft=none trains ALL weights (every parameter tensor of the tiny model moves) and saves a whole model
    directory that load_generator (the loop's evaluate/judge path) loads in place of the base weights."""
    import torch

    from src.models.loading import load_generator

    base, _ = load_for_training(SPEC, model_cache())
    before = {k: v.detach().clone() for k, v in base.named_parameters()}
    cfg = TrainConfig(peft="none", learning_rate=1e-3, num_epochs=1, per_device_batch_size=4, max_length=512)
    stats = train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, tmp_path, seed=0, report_to_mlflow=False)
    assert stats["trained"] and stats["produced"] == "full"
    assert (tmp_path / "model" / "config.json").is_file() and not (tmp_path / "adapter").exists()
    gen = load_generator(SPEC, adapter=tmp_path / "model", cache_dir=model_cache())
    after = dict(gen.model.named_parameters())
    assert after.keys() == before.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k].detach().cpu())]
    assert unchanged == []
    gen.close()


def test_init_from_previous_with_full_weights(tmp_path):
    """peft=none with init_from=previous continues from the previous iteration's saved model, not the seed."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(peft="none", learning_rate=1e-3, num_epochs=1, per_device_batch_size=4, max_length=512)
    train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, tmp_path / "a", seed=0, report_to_mlflow=False)
    train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), tmp_path / "a" / "model", tmp_path / "b", seed=0, report_to_mlflow=False)
    fresh = TrainConfig(peft="none", learning_rate=1e-3, num_epochs=1, per_device_batch_size=4, max_length=512)
    train.run(fresh, EXAMPLES, load_for_training(SPEC, model_cache()), None, tmp_path / "c", seed=0, report_to_mlflow=False)
    a, b, c = (dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / d / "model")).named_parameters()) for d in "abc")
    assert all(torch.equal(a[k], c[k]) for k in a)  # same start, same seed: same result (the comparison is meaningful)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # b started from a and trained further


def test_dpo_restores_ab_balance_after_dropping_examples_without_a_negative(tmp_path):
    """RAM balances A/B among the examples that have a negative: dropping the A-side negatives must not leave
    the B side over-represented."""
    lopsided = [e if e.verdict == "B" or e.pair_id in ("p0",) else TrainExample(e.pair_id, e.order, e.prompt, e.completion, e.verdict, None)
                for e in EXAMPLES]
    cfg = TrainConfig(method="dpo", num_epochs=1, per_device_batch_size=2, max_length=512, lora_r=4)
    stats = train.run(cfg, lopsided, load_for_training(SPEC, model_cache()), None, tmp_path, seed=0, report_to_mlflow=False)
    # 1 A example (p0) and 4 B examples have a rejected judgment: balanced to 1 + 1.
    assert stats["examples"] == 2 and stats["dropped_unbalanced"] == 3


class _Killed(Exception):
    pass


def _dies_at_step(n: int, real):
    """Trainer.training_step that raises _Killed at its n-th call (standing in for SIGKILL), else runs `real`."""
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed()
        return real(self, *a, **k)

    return step


def test_train_loss_after_resume_is_the_mean_over_all_steps(tmp_path, monkeypatch):
    """Issue 9: a training killed after its checkpoint and resumed logs the same train_loss as an unbroken one
    (TRL's training_loss divided the post-resume losses by all steps). The kill is an exception raised from the
    training step, standing in for SIGKILL."""
    from transformers import Trainer

    cfg = TrainConfig(learning_rate=5e-3, num_epochs=3, per_device_batch_size=2, max_length=512, lora_r=4, save_steps=4)
    unbroken = train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, tmp_path / "unbroken", seed=0, report_to_mlflow=False)
    assert unbroken["steps"] == 12

    real = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", _dies_at_step(7, real))
    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, out, seed=0, report_to_mlflow=False)
    assert any((out / "checkpoints").glob("checkpoint-4"))
    monkeypatch.setattr(Trainer, "training_step", real)
    resumed = train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, out, seed=0, report_to_mlflow=False)
    assert resumed["resumed"] and resumed["steps"] == 12 and len(resumed["losses"]) == 12
    assert resumed["train_loss"] == pytest.approx(sum(resumed["losses"]) / 12)
    assert resumed["train_loss"] == pytest.approx(unbroken["train_loss"], rel=1e-3)


def test_a_cut_checkpoint_save_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch, caplog):
    """Issue 21: a save cut by a full disk (or a kill) left checkpoint-8 with a 4 KB optimizer.pt and no
    trainer_state.json, and every rerun failed with FileNotFoundError. The rerun now resumes from checkpoint-4 and
    ends where an unbroken run ends; with no complete checkpoint at all it trains from the start."""
    from transformers import Trainer

    cfg = TrainConfig(learning_rate=5e-3, num_epochs=3, per_device_batch_size=2, max_length=512, lora_r=4, save_steps=4)
    real = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", _dies_at_step(7, real))
    out = tmp_path / "cut"
    with pytest.raises(_Killed):
        train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, out, seed=0, report_to_mlflow=False)
    monkeypatch.setattr(Trainer, "training_step", real)
    ckpts = out / "checkpoints"
    cut = ckpts / "checkpoint-8"  # what the failed save of step 8 left
    cut.mkdir()
    (cut / "optimizer.pt").write_bytes(b"\0" * 4096)
    assert train.resumable_checkpoint(ckpts) == ckpts / "checkpoint-4"
    with caplog.at_level("WARNING", logger="src.stages.train"):
        resumed = train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, out, seed=0, report_to_mlflow=False)
    assert resumed["resumed"] and resumed["steps"] == 12 and len(resumed["losses"]) == 12
    assert any("checkpoint-8 is an incomplete checkpoint" in r.getMessage() for r in caplog.records)
    # a state file cut while being written (a kill), and no complete checkpoint at all
    fake = tmp_path / "fake"
    for step, state in ((2, '{"global_step": 2}'), (10, '{"global_st')):
        (fake / f"checkpoint-{step}").mkdir(parents=True)
        (fake / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert train.resumable_checkpoint(fake) == fake / "checkpoint-2"
    (fake / "checkpoint-2" / "trainer_state.json").unlink()
    assert train.resumable_checkpoint(fake) is None and train.resumable_checkpoint(tmp_path / "none") is None


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_training_child_run_carries_the_settings_that_matter(tmp_path, method):
    """TRL's MLflow callback would log ~170 TrainingArguments and model-config params; the child run gets the ones a
    comparison needs (and the per-step curves, as before)."""
    import mlflow

    from src.tracking import Tracker, TrackingConfig

    cfg = TrainConfig(method=method, max_steps=1, per_device_batch_size=4, max_length=512, lora_r=4, lora_alpha=8, sft_weight=1.5)
    t = Tracker(TrackingConfig(), tmp_path / "store")
    t.start("job", {}, {}, sweep=None)
    with t.child("train-iter1") as active:
        train.run(cfg, EXAMPLES, load_for_training(SPEC, model_cache()), None, tmp_path / "out", seed=3, report_to_mlflow=active)
        child_id = mlflow.active_run().info.run_id
    t.end()
    child = mlflow.tracking.MlflowClient().get_run(child_id)
    params = child.data.params
    assert len(params) <= 30, sorted(params)
    assert params["learning_rate"] == str(cfg.learning_rate) and params["max_steps"] == "1" and params["seed"] == "3"
    assert params["peft.r"] == "4" and params["peft.lora_alpha"] == "8" and params["world_size"] == "1"
    assert params["peft.target_modules"] == str(sorted(cfg.lora_target_modules))
    if method == "dpo":
        assert params["beta"] == "0.1" and params["loss_weights"] == "[1.0, 1.5]" and params["loss_type"] == "['sigmoid', 'sft']"
    assert "train_loss" in child.data.metrics


def test_training_params_pick_the_essentials():
    from peft import LoraConfig

    args = {"learning_rate": 1e-3, "output_dir": "/tmp/x", "logging_dir": "/tmp/x/logs", "push_to_hub": False, "seed": 1,
            "hub_token": None, "beta": None, "adam_beta2": 0.95, "world_size": 2}
    p = train.training_params(args, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["v_proj", "q_proj"]))
    assert p == {"learning_rate": 1e-3, "seed": 1, "adam_beta2": 0.95, "world_size": 2, "peft.r": 8, "peft.lora_alpha": 16,
                 "peft.lora_dropout": 0.05, "peft.target_modules": ["q_proj", "v_proj"]}
