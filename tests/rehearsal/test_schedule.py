"""The paper preset's training schedule (issue 16 §3): pure plan checks, no model loads."""
import pytest
from hydra import compose, initialize_config_dir

from src.config import ConfigError
from src.config import CONF_DIR
from src.job import Job
from src.costs import schedule


def job_of(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return Job.from_config(compose("config", overrides=overrides))


def test_paper_preset_trains_thousands_of_steps_without_accumulation():
    """RAM's SFT: no accumulation, <= 8,192 tokens per batch; the old preset (x16 accumulation) made ~150 steps."""
    job = job_of(["+experiments=paper"])
    s = schedule.train_schedule(job)
    assert job.train.gradient_accumulation_steps == 1 and job.train.max_length <= 8192
    assert s["global_batch"] == 32
    assert s["steps"] >= 2000 and s["steps"] > 10 * s["warmup"]


def test_steps_not_exceeding_warmup_is_refused():
    job = job_of(["+experiments=paper", "train.gradient_accumulation_steps=16", "dataset.limit=5000"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        schedule.check_schedule(job)


def test_gpu_hours_held_counts_the_whole_allocation():
    """The paper's sbatch job holds 4 x 8 GPUs for the whole run, not only while a stage uses them (§5)."""
    from src.costs import estimate

    job = job_of(["+experiments=paper"])
    assert estimate.held_gpus(job) == 32
    line = estimate.describe(job)
    assert "GPU-h used" in line and "GPU-h held (32 GPUs" in line


def test_paper_negatives_sample_like_ram():
    """RAM generated chosen and rejected answers at T 0.7, top-p 0.9; the preset was greedy (§3)."""
    job = job_of(["+experiments=paper"])
    assert (job.negatives.temperature, job.negatives.top_p) == (0.7, 0.9)
