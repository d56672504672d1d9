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
    """The 70B full fine-tune must checkpoint activations one way or the other (README: ~17 GB per GPU with it)."""
    env, _ = _process_env("fsdp_4nodes", tmp_path)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
