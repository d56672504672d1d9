"""The real CLI in a subprocess on the tiny model: what lands in the MLflow store, and what a rerun reuses."""
import os
import subprocess
import sys

import pytest

from tests.conftest import DATA_ROOT, REPO, TINY, model_cache

# MLflow on, and majority vote (maj_k=2, on RewardBench and the held-out synthetic pairs), whose metric names MLflow
# must accept.
TRACKED = [o for o in TINY if not o.startswith("tracking=")] + ["eval.rewardbench.maj_k=2", "eval.synthetic_maj_k=2"]


def cli(results, *args, check=True):
    env = {**os.environ, "STE_DATA_ROOT": str(DATA_ROOT), "STE_RESULTS_DIR": str(results), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "src.main", *args, f"pipeline.model_cache_dir={model_cache()}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def store(results):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    return mlflow.tracking.MlflowClient()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("e2e")
    proc = cli(results, *TRACKED)
    return results, proc


def test_run_logs_params_metrics_and_artifacts(first_run):
    results, _ = first_run
    client = store(results)
    exp = client.get_experiment_by_name("ste")
    jobs = client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'job'")
    assert len(jobs) == 1
    run = jobs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["choice.filter"] == "correct" and run.data.params["choice.seed"] == "tiny_random"
    assert run.data.params["judging.n"] == "2"
    assert run.data.params["prompt.judging"].startswith("eval_plan.txt@")
    assert run.data.params["prompt.eval"].startswith("self_taught_eval.json@")
    for metric in ["synthetic/accuracy", "synthetic/parse_fail", "synthetic/swap_consistency"]:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
        assert steps == [0, 1], metric
    for metric in ["rewardbench/overall", "rewardbench/chat_hard", "rewardbench/swap_consistency", "rewardbench/parse_fail",
                   "mtbench/agreement_s1", "mtbench/agreement_s1/turn1", "rewardbench/overall_maj2",
                   "rewardbench/constrained/overall", "rewardbench/clipped"]:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, metric)) == [0, 1], metric
    # Drops by reason and truncations per role reach MLflow as numbers (issue 7).
    for metric in ["generate/dropped/format_break", "generate/dropped/modified_equals_original", "generate/truncated/chosen",
                   "generate/truncated/rejected"]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0], metric
    for metric in ["filter/keep_rate", "filter/examples_per_judgment", "filter/judged", "judge/tokens", "time/judge", "train/examples", "judge/clipped", "judge/clipped_to_fit"]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1], metric
    # Vote-k curve (k = 1, 2 from the one set of 2 samples) with its token cost; position bias and flips per iteration.
    for metric in ["rewardbench/vote_k/overall_k1", "rewardbench/vote_k/overall_k2", "rewardbench/vote_k/tokens_k2",
                   "synthetic/vote_k/accuracy_k1", "synthetic/vote_k/accuracy_k2", "synthetic/vote_k/tokens_k2", "synthetic/accuracy_maj2"]:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, metric)) == [0, 1], metric
    # P(verdict = A) among stated verdicts: undefined (not logged) at an iteration where the tiny model stated none
    for metric in ["synthetic/position/frac_A", "rewardbench/position/frac_A", "mtbench/position/frac_A"]:
        assert all(0 <= h.value <= 1 and h.step in (0, 1) for h in client.get_metric_history(run.info.run_id, metric)), metric
    m = run.data.metrics
    assert m["rewardbench/vote_k/overall_k2"] == m["rewardbench/overall_maj2"]
    assert m["rewardbench/vote_k/tokens_k2"] >= m["rewardbench/vote_k/tokens_k1"] > 0
    assert m["synthetic/vote_k/accuracy_k2"] == m["synthetic/accuracy_maj2"]
    assert m["synthetic/vote_k/tokens_k2"] >= m["synthetic/vote_k/tokens_k1"] > 0
    for metric in ["synthetic/position/flips", "synthetic/position/flips_to_correct", "rewardbench/position/flips", "mtbench/position/flips"]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1], metric
    assert abs(m["synthetic/position/flips"] - m["synthetic/position/flips_to_correct"] - m["synthetic/position/flips_to_wrong"]) < 1e-9
    # Provenance: the code and the packages that made the numbers.
    assert run.data.tags["git.commit"] and run.data.tags["version.torch"]
    acc = run.data.metrics["synthetic/accuracy"]
    assert 0.0 <= acc <= 1.0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plan.txt", "data", "tables"} <= names
    data = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/select_iter0", "data/generate_iter0", "data/judge_iter1", "data/filter_iter1", "data/synthetic_iter1"} <= data
    # Decontamination (ShareGPT pool): the matched ids as an artifact, counts per benchmark and subset as metrics.
    assert "data/decontam_iter0" in data and run.data.metrics["decontam/exact"] == 27
    assert run.data.metrics["decontam/rewardbench/llmbar-adver-neighbor"] > 0
    # Training has its own child run, so TRL's callback logs there.
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert run.data.metrics["train/trained"] == 1.0 and run.data.metrics["train/examples"] > 0
    assert len(children) == 1 and children[0].data.tags["ste.kind"] == "train"
    assert "train_loss" in children[0].data.metrics and "loss" not in run.data.metrics  # TRL logged into the child


def test_rerun_recomputes_nothing(first_run):
    results, _ = first_run
    proc = cli(results, *TRACKED)
    log = proc.stdout + proc.stderr
    assert "computing" not in log
    for stage in ["select[iter 0]", "generate[iter 0]", "judge[iter 1]", "train[iter 1]", "synthetic[iter 1]"]:
        assert f"{stage}: cached" in log
    client = store(results)
    exp = client.get_experiment_by_name("ste")
    latest = client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'job'", order_by=["attributes.start_time DESC"])[0]
    assert latest.data.metrics["cache/hits"] == latest.data.metrics["cache/stages"] == 12  # 11 + decontam


def test_filter_sweep_shares_stages_and_groups_runs(first_run):
    results, _ = first_run
    proc = cli(results, "-m", *TRACKED, "filter=correct,all")
    log = proc.stdout + proc.stderr
    # filter=correct is fully cached from the first run; filter=all recomputes only filter/train/evaluate(1).
    assert log.count("judge[iter 1]: cached") == 2 and log.count("generate[iter 0]: cached") == 2
    assert "filter[iter 1]: computing" in log
    client = store(results)
    exp = client.get_experiment_by_name("ste")
    sweeps = client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'sweep'")
    assert len(sweeps) == 1
    members = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{sweeps[0].info.run_id}'")
    assert sorted(r.data.params["choice.filter"] for r in members) == ["all", "correct"]
    run_all = next(r for r in members if r.data.params["choice.filter"] == "all")
    assert run_all.data.metrics["cache_hit/judge"] == 1.0 and run_all.data.metrics["cache_hit/filter"] == 0.0
    # The multirun's callback wrote the report; the standalone command rebuilds the same one from the store.
    (report_dir,) = (results / "reports").iterdir()
    md = (report_dir / "report.md").read_text()
    assert "filter=correct | FINISHED" in md and "filter=all | FINISHED" in md
    rebuilt = subprocess.run([sys.executable, "-m", "src.report", "--results-dir", str(results), "--out", str(results / "rebuilt")],
                             cwd=REPO, capture_output=True, text=True, check=True)
    assert (results / "rebuilt" / "report.md").read_text() == md, rebuilt.stderr


def test_paper_models_dry_run_prints_plans_and_real_run_fails_fast(tmp_path):
    # Alone, the design card's seed sweep implies the paper preset: the same two paper-scale plans.
    proc = cli(tmp_path, "-m", "seed=mixtral,llama", "pipeline.dry_run=true", "tracking=none")
    plans = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    assert len(plans) == 2 and all("experiments=paper" in line for line in plans)
    proc = cli(tmp_path, "-m", "+experiments=paper", "seed=mixtral,llama", "pipeline.dry_run=true", "tracking=none")
    assert proc.stdout.count("plan: ") == 2
    assert "seed=mixtral" in proc.stdout and "seed=llama" in proc.stdout
    assert "NOT RUNNABLE HERE" in proc.stdout and proc.stdout.count("gpus: seed") == 2
    proc = cli(tmp_path, "+experiments=paper", "seed=mixtral", "tracking=none", check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "vllm" in err.lower() and "qwen_coder_0.5b" in err


def test_run_records_inputs_weights_and_few_training_params(first_run):
    """Issue 8 §6: every run records its inputs as MLflow datasets with digests, the hash of every model's weights
    (seed, judge base, the trained adapter, which is also an artifact), and training children carry only the
    training settings that matter."""
    from src.models.loading import resolve_model_dir
    from src.models.base import ModelSpec
    from src.models.weights import weights_hash

    results, _ = first_run
    client = store(results)
    exp = client.get_experiment_by_name("ste")
    run = client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'job'", order_by=["attributes.start_time ASC"])[0]
    # inputs: the selected pool slice for training; each benchmark slice for evaluation
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"select", "synthetic", "rewardbench", "mtbench"}
    assert [t.value for t in inputs["select"].tags if t.key == "mlflow.data.context"] == ["training"]
    assert [t.value for t in inputs["rewardbench"].tags if t.key == "mlflow.data.context"] == ["evaluation"]
    assert "rewardbench/filtered.jsonl.gz" in inputs["rewardbench"].dataset.source
    assert len({d.dataset.digest for d in inputs.values()}) == 4
    # weights: the tiny model in both roles (same bytes, same hash, whoever computes it) and the iteration-1 adapter
    tags = run.data.tags
    tiny = resolve_model_dir(ModelSpec(name="tiny_random", source="tiny_random"), model_cache())
    assert tags["weights.seed"] == tags["weights.judge"] == weights_hash(tiny)
    adapter = tags["weights.iter1.path"]
    assert adapter.endswith("/adapter") and tags["weights.iter1"] == weights_hash(adapter)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "models/iter1/adapter")}
    assert "models/iter1/adapter/adapter_model.safetensors" in logged
    # training child: the settings that matter, not TRL's ~170 arguments
    (child,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    params = child.data.params
    assert len(params) <= 30, sorted(params)
    for key in ["learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "max_length", "seed",
                "bf16", "world_size", "peft.r", "peft.lora_alpha", "peft.lora_dropout", "peft.target_modules"]:
        assert key in params, key
    assert params["peft.r"] == "8" and params["per_device_train_batch_size"] == "4"
    assert "train_loss" in child.data.metrics and "loss" in child.data.metrics  # the curves still reach the child
