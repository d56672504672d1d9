"""Rehearsal (issue 16, §2): the trainer's own arguments under every `launch` option, in the environment that
`accelerate launch` gives each training process.

What runs here for real: accelerate's own launcher parsing of the config file `src.launch.accelerate_config` writes
(GPU side, cpu=False), its per-process environment (`prepare_multi_gpu_env`), accelerate's FSDP plugin built from
that environment, and the TRL config the train stage builds (`train.training_arguments`). What cannot run on CPU:
the FSDP wrap itself (it needs CUDA and a process group per GPU); the check transformers makes when the Trainer is
built (`trainer.py`: FSDP activation checkpointing and gradient_checkpointing both on is a ValueError) is applied
to the same two objects."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF

LAUNCHES = sorted(p.stem for p in (CONF / "launch").glob("*.yaml"))


def _process_env(launch_name: str, tmp_path: Path) -> tuple[dict, dict]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    from src.config import typed
    from src.launch import LaunchConfig, accelerate_config

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"launch={launch_name}", "+experiments=paper"])
    launch = typed(LaunchConfig, cfg.launch, "launch")
    file = tmp_path / "accelerate.json"
    file.write_text(json.dumps(accelerate_config(launch, cpu=False)))
    args = launch_command_parser().parse_args(
        ["--config_file", str(file), "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "-m", "src.launch"])
    args, _, _ = _validate_launch_command(args)
    if launch.world_size > 1:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return env, cfg


@pytest.mark.parametrize("launch_name", LAUNCHES)
def test_trainer_arguments_pass_transformers_fsdp_check_for_every_launch(launch_name, tmp_path, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from src.config import typed
    from src.stages import train

    env, cfg = _process_env(launch_name, tmp_path)
    # on_gpu: the arguments each GPU process builds (on this CPU machine, checkpointing is off: train.gradient_checkpointing)
    args = train.training_arguments(typed(train.TrainConfig, cfg.train, "train"), tmp_path / "ckpt", 0, env, on_gpu=True)
    if env.get("ACCELERATE_USE_FSDP") == "true":
        for k, v in env.items():  # the plugin reads its settings from the process environment, as in the worker
            monkeypatch.setenv(k, v)
        # sync_module_states (and cpu_ram_efficient_loading, which implies it) asks for the current CUDA device in the plugin's __post_init__: the one setting that
        # cannot be built on CPU; it does not touch the activation-checkpointing setting read here.
        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # it turns sync_module_states back on
        plugin = FullyShardedDataParallelPlugin()
        # transformers/trainer.py (5.17) raises exactly when both are on
        assert not (plugin.activation_checkpointing and args.gradient_checkpointing)
        if plugin.activation_checkpointing:
            assert args.gradient_checkpointing is False
    else:
        assert args.gradient_checkpointing is True  # TRL's default stays where nothing else checkpoints
    cpu = train.training_arguments(typed(train.TrainConfig, cfg.train, "train"), tmp_path / "ckpt", 0, env, on_gpu=False)
    assert cpu.gradient_checkpointing is False and cpu.use_cpu and not cpu.bf16


def test_paper_launch_uses_fsdp_activation_checkpointing(tmp_path):
    """The 70B full fine-tune must checkpoint activations one way or the other (docs/training-and-launch.md, Training memory)."""
    env, _ = _process_env("fsdp_4nodes", tmp_path)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"


FSDP_LAUNCHES = ["fsdp_4nodes", "fsdp_offload_1node", "lora_1node"]


@pytest.mark.parametrize("launch_name", FSDP_LAUNCHES)
def test_fsdp_launches_checkpoint_sharded(launch_name, tmp_path, monkeypatch):
    """Intermediate checkpoints are SHARDED_STATE_DICT: each rank writes its own part. FULL_STATE_DICT would gather
    the whole model and optimizer state (Llama-3-70B: ~1.1 TB) into rank 0's CPU memory at every `save_steps`.
    Built for real: accelerate's plugin from the process environment `accelerate launch` gives; transformers (5.17,
    trainer.py) refuses `save_only_model` with a sharded state dict, so the trainer arguments must not ask for it."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    from src.config import typed
    from src.stages import train

    env, cfg = _process_env(launch_name, tmp_path)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # asks for a CUDA device (see above)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    args = train.training_arguments(typed(train.TrainConfig, cfg.train, "train"), tmp_path / "ckpt", 0, env, on_gpu=True)
    assert not args.save_only_model


def _sharded_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint directory laid out as transformers + accelerate write one under SHARDED_STATE_DICT
    (`_save_checkpoint` -> save_fsdp_model / save_fsdp_optimizer -> torch.distributed.checkpoint.save with a
    FileSystemWriter): real DCP directories, written here by one process (a GPU run writes one `.distcp` per rank)."""
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt = root / f"checkpoint-{step}"
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(str(ckpt / "pytorch_model_fsdp_0")))
    dcp.save({"optimizer": opt.state_dict()}, storage_writer=dcp.FileSystemWriter(str(ckpt / "optimizer_0")))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name in ("scheduler.pt", "rng_state_0.pth"):
        (ckpt / name).write_bytes(b"x")
    return ckpt


def test_sharded_checkpoint_completeness(tmp_path, caplog):
    """A sharded checkpoint resumes only with both DCP directories, each with its `.metadata` and every file that
    metadata names; trainer_state.json alone does not prove it (a copy or sync that lost a shard still has it)."""
    from src.stages import train

    good = _sharded_checkpoint(tmp_path, 2)
    assert sorted(p.name for p in (good / "pytorch_model_fsdp_0").iterdir())[0] == ".metadata"
    assert train.checkpoint_complete(good)

    no_meta = _sharded_checkpoint(tmp_path, 4)
    (no_meta / "optimizer_0" / ".metadata").unlink()  # the coordinator writes it last: a cut save has none
    lost_shard = _sharded_checkpoint(tmp_path, 6)
    next((lost_shard / "pytorch_model_fsdp_0").glob("*.distcp")).unlink()
    no_optimizer = _sharded_checkpoint(tmp_path, 8)
    import shutil

    shutil.rmtree(no_optimizer / "optimizer_0")  # transformers would resume with a fresh optimizer, silently
    truncated = _sharded_checkpoint(tmp_path, 10)
    (truncated / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"\x80")
    for cut in (no_meta, lost_shard, no_optimizer, truncated):
        assert not train.checkpoint_complete(cut), cut
    with caplog.at_level("WARNING"):
        assert train.resumable_checkpoint(tmp_path) == good
    assert sum("incomplete checkpoint" in r.message for r in caplog.records) == 4


def test_final_save_under_fsdp_writes_a_bf16_model_from_pretrained_loads(tmp_path, monkeypatch):
    """With SHARDED_STATE_DICT, transformers' save_model (5.17) writes no weights at all under FSDP; the train stage
    switches the plugin to FULL_STATE_DICT for the final save and writes a full fine-tune in bf16.

    Real: the tiny model, TRL's SFTTrainer, accelerate's FSDP plugin built from an FSDP launch's environment,
    transformers' save path. Faked (FSDP cannot wrap a model without CUDA): the trainer is told FSDP is on (the
    plugin placed on the accelerator state, `is_fsdp_enabled`, `args.bf16` as on a GPU); accelerate's
    `get_state_dict` then returns the unwrapped model's fp32 state dict, which is what FSDP's FULL_STATE_DICT gather
    hands rank 0 (accelerate upcasts the sharded parameters to fp32 under mixed precision)."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from safetensors.torch import load_file
    from torch.distributed.fsdp import StateDictType
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from src.models.loading import load_for_training
    from src.stages import train
    from tests.conftest import model_cache
    from tests.stages.test_train import EXAMPLES, SPEC

    env, _ = _process_env("fsdp_4nodes", tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    plugin = FullyShardedDataParallelPlugin()
    for k in env:  # the trainer below runs on this CPU without FSDP
        monkeypatch.delenv(k)
    model, tok = load_for_training(SPEC, model_cache())
    cfg = train.TrainConfig(peft="none", max_steps=1, per_device_batch_size=2, max_length=512)
    trainer = SFTTrainer(model=model, args=train.training_arguments(cfg, tmp_path / "ckpt", 0, {}), processing_class=tok,
                         train_dataset=train._dataset(EXAMPLES[:2], "sft"))
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", plugin, raising=False)  # unset on CPU
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    trainer.args.bf16 = True

    trainer.save_model(str(tmp_path / "as_is"))  # what the stage did before: nothing to load
    assert not list((tmp_path / "as_is").glob("*.safetensors"))

    train.save_output(trainer, tmp_path / "model", full=True)
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert loaded.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(weights[k], v.to(torch.bfloat16)), k
    assert train.is_full_model(tmp_path / "model")
