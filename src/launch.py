"""Where the train stage runs: in the loop's process, or in processes of its own under `accelerate launch`.
Reads the `launch` group.

Generation leaves its engine (vLLM takes 90% of a GPU) in the loop's process; training in a process of its own
starts on an empty GPU and gives everything back when it exits, which is also the only way to train on more
than one GPU (FSDP full-shard: each process holds 1/N of the weights, gradients and optimizer state). The
worker (`python -m src.launch REQUEST.json`, started by `accelerate launch`) calls the same
`src.stages.train.run` the in-process path calls.

`train_memory` is the arithmetic the dry run uses to refuse a training config the GPUs it asks for cannot hold.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from src.config import ConfigError
from src.costs.memory import breakdown, full_finetune, train_estimate

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


@dataclass
class LaunchConfig:
    num_processes: int = 1  # processes (= GPUs) per machine
    num_machines: int = 1  # > 1: run inside a SLURM allocation of that many nodes (docs/gpus-and-vllm.md)
    subprocess: bool = False  # train in a process of its own even with one process (GPU: always do)
    strategy: str = "ddp"  # ddp (each process a whole model) | fsdp (full shard)
    fsdp_offload: bool = False  # FSDP keeps parameters, gradients and optimizer state in CPU memory
    activation_checkpointing: bool = True
    mixed_precision: str = "bf16"  # on GPU; CPU processes always train in fp32
    gpu_memory_gb: float = 80.0  # per GPU; the dry run refuses a training estimate above it
    host_memory_gb: float = 1000.0  # per machine; checked when fsdp_offload puts the state there
    main_process_port: int = 29500

    def validate(self, where: str) -> None:
        if self.num_processes < 1 or self.num_machines < 1:
            raise ConfigError(f"{where}.num_processes and {where}.num_machines must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"{where}.strategy={self.strategy!r}: one of {', '.join(STRATEGIES)}")
        if self.fsdp_offload and self.strategy != "fsdp":
            raise ConfigError(f"{where}.fsdp_offload=true needs {where}.strategy=fsdp")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"{where}.mixed_precision={self.mixed_precision!r}: no, bf16 or fp16")

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @property
    def isolated(self) -> bool:
        return self.subprocess or self.world_size > 1


def free_accelerator_memory() -> None:
    """Collect what the closed models left and hand the CUDA cache back, so the next stage (an engine that
    checks free memory at start) finds the GPU empty."""
    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --- memory arithmetic -------------------------------------------------------------------------------------


def describe(launch: LaunchConfig, train_cfg, judge_spec, seed_spec) -> str:
    """The dry run's resource lines: GPUs per stage and the training memory estimate."""
    def gpus(spec) -> str:
        n = max(spec.min_gpus, spec.tensor_parallel_size if spec.backend == "vllm" else 0)
        return f"{n} GPU{'s' if n != 1 else ''}" if n else "CPU"

    est = train_estimate(launch, train_cfg, judge_spec)
    kind = "full fine-tune" if full_finetune(train_cfg) else "LoRA"
    lines = [f"  gpus: seed {seed_spec.name} {gpus(seed_spec)}, judge {judge_spec.name} {gpus(judge_spec)} (generate/judge/evaluate); "
             f"train {launch.num_machines}x{launch.num_processes} process(es), {launch.strategy}"
             f"{' + CPU offload' if launch.fsdp_offload else ''}{', own process' if launch.isolated else ''}"]
    if est is None:
        lines.append(f"  train memory: unknown size of {judge_spec.name} (not estimated)")
    else:
        lines.append(f"  train memory ({kind}, AdamW mixed precision): state {est['state_total_gb']:.0f} GB in all, "
                     f"~{est['per_gpu_gb']:.1f} GB per GPU (budget {launch.gpu_memory_gb:g}: {breakdown(est)})"
                     + (f", {est['host_per_machine_gb']:.0f} GB CPU memory per machine" if est["host_per_machine_gb"] else ""))
    return "\n".join(lines)


# --- launching ---------------------------------------------------------------------------------------------

def accelerate_config(launch: LaunchConfig, cpu: bool) -> dict:
    """The `accelerate launch --config_file` contents. On CPU the processes talk over gloo in fp32."""
    multi = launch.world_size > 1
    cfg = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": ("FSDP" if launch.strategy == "fsdp" and not cpu else "MULTI_GPU") if multi else "NO",
        "num_processes": launch.world_size,  # accelerate counts processes over all machines
        "num_machines": launch.num_machines,
        "machine_rank": 0,
        "main_process_port": launch.main_process_port,
        "mixed_precision": "no" if cpu else launch.mixed_precision,
        "use_cpu": cpu,
        "dynamo_config": {"dynamo_backend": "NO"},
        "rdzv_backend": "static",
        "same_network": True,
    }
    if launch.strategy == "fsdp" and multi and not cpu:
        cfg["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer (_no_split_modules)
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            # Checkpoints during training: each rank writes its own shard of weights and optimizer state
            # (torch.distributed.checkpoint), where FULL_STATE_DICT would gather all of it into rank 0's CPU
            # memory at every save (Llama-3-70B: 1.1 TB). The final weights are gathered once, in bf16, as a
            # from_pretrained directory (src/stages/train.py: save_output).
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_offload_params": launch.fsdp_offload,
            "fsdp_activation_checkpointing": launch.activation_checkpointing,
            # Rank 0 reads the checkpoint, the others start on the meta device: 8 processes do not each hold 140 GB.
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True,
            "fsdp_use_orig_params": True,  # LoRA: frozen and trained parameters in one unit
        }
    return cfg


def allocation_problems(launch: LaunchConfig, env, which=shutil.which) -> list[str]:
    """Why this process cannot start a `launch` that spans several machines, checked at preflight (before any
    model loads, so a one-node allocation fails in seconds, not at the first train stage after ~140 GPU-hours of
    generation): it must run inside a SLURM allocation of at least `num_machines` nodes, with `srun` on PATH."""
    if launch.num_machines <= 1:
        return []
    get = f"e.g. sbatch --nodes={launch.num_machines} scripts/slurm_paper.sbatch (or salloc --nodes={launch.num_machines})"
    problems = []
    if which("srun") is None:
        problems.append(f"launch: num_machines={launch.num_machines} trains through srun, which is not on PATH here; "
                        f"run inside a SLURM allocation: {get}")
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if not env.get("SLURM_JOB_ID") or not nodes:
        problems.append(f"launch: num_machines={launch.num_machines} needs a SLURM allocation of "
                        f"{launch.num_machines} nodes and this process is not in one (no SLURM_JOB_ID / SLURM_JOB_NUM_NODES): {get}")
    elif int(nodes) < launch.num_machines:
        problems.append(f"launch: num_machines={launch.num_machines} but this allocation (job {env['SLURM_JOB_ID']}) "
                        f"has {nodes} node(s): {get}")
    return problems


def launch_command(launch: LaunchConfig, config_file: Path, request: Path, cpu: bool, env=None) -> list[str]:
    """The command that starts the training processes. Several machines: one `accelerate launch` per node via
    srun, node rank and rendezvous host from SLURM (the loop runs on the allocation's first node). srun gets the
    allocation's CPUs per task explicitly: since Slurm 22.05 it no longer inherits sbatch's --cpus-per-task, and
    a node's 8 ranks would share one core."""
    env = os.environ if env is None else env
    acc = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if launch.world_size > 1 and (cpu or launch.strategy == "ddp"):
        acc.append("--multi_gpu")  # on CPU this still starts N processes; each picks gloo (use_cpu)
    if launch.num_machines > 1:
        script = " ".join(acc) + (' --machine_rank "$SLURM_NODEID" --main_process_ip '
                                  '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" -m src.launch ' + str(request))
        cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE")
        return ["srun", f"--nodes={launch.num_machines}", "--ntasks-per-node=1",
                *([f"--cpus-per-task={cpus}"] if cpus else []), "bash", "-c", script]
    return acc + ["-m", "src.launch", str(request)]


def run_train(launch: LaunchConfig, train_cfg, examples: list, judge_spec, model_cache: Path | None,
              previous_adapter: Path | None, out_dir: Path, seed: int, report_to_mlflow: bool) -> dict:
    """Run the train stage as `launch` says; the stats `train.run` returns."""
    from src.stages import train

    if not launch.isolated:
        from src.models.loading import load_for_training

        try:
            return train.run(train_cfg, examples, load_for_training(judge_spec, model_cache), previous_adapter, out_dir,
                             seed, report_to_mlflow)
        finally:
            free_accelerator_memory()
    import torch
    from src.records import to_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    request = out_dir / "launch_request.json"
    stats_file = out_dir / "launch_stats.json"
    stats_file.unlink(missing_ok=True)
    request.write_text(json.dumps({
        "train": dataclasses.asdict(train_cfg), "examples": [to_dict(e) for e in examples],
        "judge": dataclasses.asdict(judge_spec), "model_cache": str(model_cache) if model_cache else None,
        "previous_adapter": str(previous_adapter) if previous_adapter else None, "out_dir": str(out_dir),
        "seed": seed, "report_to_mlflow": report_to_mlflow, "stats_file": str(stats_file),
    }))
    cpu = not torch.cuda.is_available()
    config_file = out_dir / "accelerate.json"
    config_file.write_text(json.dumps(accelerate_config(launch, cpu), indent=1))
    cmd = launch_command(launch, config_file, request, cpu)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # the `src` this process imported, first on the path
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if report_to_mlflow:
        import mlflow

        run = mlflow.active_run()
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
        if run is not None:  # the workers log into the open train child run
            env["MLFLOW_RUN_ID"] = run.info.run_id
    log.info("train: %d process(es) in their own process group: %s", launch.world_size, " ".join(cmd))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"train: the training processes failed (exit status {proc.returncode}); command: {' '.join(cmd)}")
    if not stats_file.exists():
        raise RuntimeError(f"train: the training processes exited without writing {stats_file}")
    stats = json.loads(stats_file.read_text())
    log.info("train: processes finished in %.1fs", time.time() - t0)
    return stats


def worker(request_path: str) -> None:
    """One training process: rebuild the typed inputs from the request and call `train.run`."""
    from accelerate import PartialState

    from src.config import typed
    from src.models.base import ModelSpec
    from src.models.loading import load_for_training
    from src.records import TrainExample, from_dict
    from src.stages import train

    req = json.loads(Path(request_path).read_text())
    # The process group first: with FSDP, from_pretrained then loads the weights on rank 0 only.
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true")
    spec = typed(ModelSpec, req["judge"], "judge")
    cfg = typed(train.TrainConfig, req["train"], "train")
    examples = [from_dict(TrainExample, e) for e in req["examples"]]
    stats = train.run(cfg, examples, load_for_training(spec, req["model_cache"]),
                      Path(req["previous_adapter"]) if req["previous_adapter"] else None, Path(req["out_dir"]),
                      int(req["seed"]), bool(req["report_to_mlflow"]) and state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        stats["processes"] = state.num_processes
        Path(req["stats_file"]).write_text(json.dumps(stats))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    worker(sys.argv[1])
