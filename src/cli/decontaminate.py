"""`python -m src.cli.decontaminate [overrides]`: the decontamination stage's counts for a config's pool and the
benchmarks it evaluates on, without a run (nothing cached, no model)."""
from __future__ import annotations

import json
import logging
import sys

from hydra import compose, initialize_config_dir

from src.config import CONF_DIR
from src.job import Job
from src.stages import decontaminate, evaluate


def main(argv: list[str]) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        job = Job.from_config(compose("config", overrides=argv))
    _, stats = decontaminate.run(job.dataset, evaluate.decontam_benchmarks(job.eval), job.data_root)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
