"""Training in processes of its own, through `accelerate launch` (src/launch.py), and Hydra's submitit launcher.

The 2-process run is real distributed training on CPU (gloo, DDP) through the same launcher code a GPU node
uses (there it would be NCCL and FSDP, which need GPUs)."""
import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from src.launch import LaunchConfig, accelerate_config, launch_command, run_train
from src.models.base import ModelSpec
from src.stages.train import TrainConfig
from tests.conftest import CONF, DATA_ROOT, REPO, TINY, model_cache
from tests.stages.test_train import EXAMPLES

SPEC = ModelSpec(name="tiny_random", source="tiny_random")
CFG = TrainConfig(num_epochs=1, per_device_batch_size=2, max_length=512, lora_r=4, learning_rate=5e-3)


def test_two_processes_train_and_save_what_one_process_saves(tmp_path):
    one = run_train(LaunchConfig(), CFG, EXAMPLES, SPEC, model_cache(), None, tmp_path / "one", 0, False)
    two = run_train(LaunchConfig(num_processes=2, main_process_port=29561), CFG, EXAMPLES, SPEC, model_cache(), None,
                    tmp_path / "two", 0, False)
    assert two["processes"] == 2 and two["trained"] and two["examples"] == one["examples"] == len(EXAMPLES)
    # 8 examples, batch 2 per process: 4 steps alone, 2 when two processes split each step's data.
    assert one["steps"] == 4 and two["steps"] == 2
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(float(w.abs().sum()) > 0 for k, w in b.items() if "lora_B" in k)  # the 2-process run trained
    # And the saved adapter loads back onto the model.
    from peft import PeftModel

    from src.models.loading import load_for_training

    model, _ = load_for_training(SPEC, model_cache())
    PeftModel.from_pretrained(model, str(tmp_path / "two" / "adapter"))


def test_one_process_of_its_own_reports_its_stats(tmp_path):
    stats = run_train(LaunchConfig(subprocess=True, main_process_port=29562), CFG, EXAMPLES[:2], SPEC, model_cache(), None,
                      tmp_path, 0, False)
    assert stats["processes"] == 1 and stats["steps"] == 1
    assert json.loads((tmp_path / "accelerate.json").read_text())["distributed_type"] == "NO"


def test_accelerate_config_for_gpus():
    """What a GPU node gets (pure: no GPU needed to build it)."""
    fsdp = LaunchConfig(num_processes=8, num_machines=4, strategy="fsdp")
    c = accelerate_config(fsdp, cpu=False)
    assert c["distributed_type"] == "FSDP" and c["num_processes"] == 32 and c["mixed_precision"] == "bf16"
    assert c["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD" and c["fsdp_config"]["fsdp_activation_checkpointing"]
    assert accelerate_config(LaunchConfig(num_processes=8, strategy="fsdp", fsdp_offload=True), cpu=False)["fsdp_config"]["fsdp_offload_params"]
    cmd = launch_command(fsdp, tmp := __import__("pathlib").Path("/x/acc.json"), tmp.with_name("req.json"), cpu=False)
    assert cmd[:3] == ["srun", "--nodes=4", "--ntasks-per-node=1"] and "$SLURM_NODEID" in cmd[-1]
    assert accelerate_config(LaunchConfig(num_processes=2), cpu=True)["distributed_type"] == "MULTI_GPU"  # + use_cpu: gloo


def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    """hydra/launcher=submitit_local: each job of a 2-job multirun is a submitit job (its own process)."""
    results = tmp_path / "results"
    env = {**os.environ, "STE_MODEL_CACHE": str(model_cache())}
    cmd = [sys.executable, "-m", "src.main", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           f"data_root={DATA_ROOT}", f"results_dir={results}", f"pipeline.model_cache_dir={model_cache()}",
           *[o for o in TINY if not o.startswith("iterations")], "iterations=0", "eval.rewardbench.enabled=false",
           "eval.mtbench.enabled=false", "random_seed=0,1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted(results.glob("hydra/multirun/*/*/.submitit/*/*_0_log.out"))
    assert len(logs) == 2, list(results.rglob(".submitit"))
    stages = [d for d in (results / "cache" / "generate").iterdir() if (d / "data.jsonl").is_file()]
    assert len(stages) == 2  # one generate stage per random_seed, each computed by its own job


def test_slurm_launcher_asks_for_the_gpus_the_models_need():
    import src.main  # noqa: F401  (registers the resolvers the launcher config uses)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        def launcher(*ov):
            return compose("config", overrides=["hydra/launcher=slurm", *ov], return_hydra_config=True).hydra.launcher

        paper = launcher("+experiments=paper")
        assert paper._target_.endswith("SlurmLauncher") and paper.gpus_per_node == 8 and paper.nodes == 1
        assert launcher("+experiments=gpu_small").gpus_per_node == 1
        assert launcher("launch=lora_1node").gpus_per_node == 8  # training's processes count too
        assert launcher("+experiments=paper", "hydra.launcher.partition=gpu").partition == "gpu"


def _slurm_sweep(tmp_path, *overrides):
    """`python -m src.main -m hydra/launcher=slurm ...` with a fake `sbatch` (and `srun`, which submitit looks for)
    first on PATH: no SLURM here, the one thing faked. The fake sbatch appends its submission script to a file and
    fails, so nothing waits on a queue."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nfor a; do last="$a"; done\ncat "$last" >> {record}\n'
                                    'echo "fake sbatch: no SLURM here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it to believe it is on a cluster
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "src.main", "-m", "hydra/launcher=slurm", f"results_dir={tmp_path / 'results'}",
           f"data_root={DATA_ROOT}", "pipeline.dry_run=true", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, record.read_text() if record.exists() else ""


def test_slurm_sweep_whose_jobs_need_different_gpus_is_refused_before_submitting(tmp_path):
    """hydra-submitit-launcher submits a whole sweep with one set of resources; a sweep of a 1-GPU and an 8-GPU job
    stops with one line naming both, and sbatch is never called."""
    proc, submitted = _slurm_sweep(tmp_path, "+experiments=gpu_small,paper")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert submitted == ""
    line = [ln for ln in proc.stderr.splitlines() if "need different resources" in ln]
    assert len(line) == 1, proc.stderr[-3000:]
    assert "#1 (+experiments=paper) has" in line[0] and "gpus_per_node=8" in line[0]
    assert "#0 (+experiments=gpu_small) has" in line[0] and "gpus_per_node=1" in line[0]
    assert "separate sweeps" in line[0] and "Traceback" not in proc.stderr


def test_slurm_sweep_is_submitted_with_its_jobs_resources(tmp_path):
    """Both jobs train on 8 processes; the sweep's primary config (Hydra leaves the sweep overrides out of it) has the
    default launch=single, 1 GPU. Each job's SLURM script asks for the 8 GPUs its own config needs."""
    proc, submitted = _slurm_sweep(tmp_path, "launch=lora_1node,fsdp_offload_1node")
    assert "fake sbatch: no SLURM here" in proc.stderr, proc.stderr[-3000:]
    assert "#SBATCH --gpus-per-node=8" in submitted and "--gpus-per-node=1" not in submitted, submitted
