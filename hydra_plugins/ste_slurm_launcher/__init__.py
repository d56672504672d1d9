"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): hydra-submitit-launcher's SLURM launcher, refusing a
sweep whose jobs need different resources.

hydra-submitit-launcher 1.2 (`BaseSubmititLauncher.launch`) builds one submitit executor for the whole sweep from
`self.params`, the launcher node resolved once against the sweep's primary config, and submits every job with it
(`executor.map_array`): `-m +experiments=gpu_small,paper` would give the paper job the GPUs the primary config
resolves to. Each job's own resources are its launcher node resolved against its own config, which is what the
job itself composes (`hydra_context.config_loader.load_sweep_config`, as the plugin's `__call__` does on the
node). When all jobs
agree, they are submitted with those resources; when they differ, the sweep stops before anything is submitted,
with one line naming the jobs and what differs (run them as separate sweeps).

Refusing rather than submitting one executor per resource group keeps the plugin's own launch (job numbering,
sweep directories, result order) untouched. It lives under `hydra_plugins` because Hydra instantiates launchers
only from that package."""
from __future__ import annotations

from typing import Any, Sequence

from hydra.core.utils import JobReturn, filter_overrides
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf


class SweepResourcesError(CompactHydraException):
    """Hydra prints the message alone (no traceback) and exits with status 1."""


def job_resources(launcher_node) -> dict[str, Any]:
    """A job's launcher node resolved against its config, without `_target_`: what submitit would be given."""
    params = OmegaConf.to_container(launcher_node, resolve=True)
    for k in ("_target_", "submitit_folder"):  # the folder is the sweep's, one for all jobs
        params.pop(k, None)
    return params


def differing(jobs: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """One line naming the jobs whose resources differ from the first job's and how, or None when all agree.
    `jobs`: (name, resources) per job, in sweep order."""
    first_name, first = jobs[0]
    diffs = []
    for name, res in jobs[1:]:
        keys = sorted(k for k in set(first) | set(res) if first.get(k) != res.get(k))
        if keys:
            diffs.append(f"{name} has " + ", ".join(f"{k}={res.get(k)}" for k in keys)
                         + " where " + first_name + " has " + ", ".join(f"{k}={first.get(k)}" for k in keys))
    if not diffs:
        return None
    return ("hydra/launcher=slurm: the jobs of this sweep need different resources, and the submitit launcher submits "
            "a whole sweep with one set (hydra-submitit-launcher 1.2): " + "; ".join(diffs)
            + ". Nothing was submitted: run them as separate sweeps, one per set of resources.")


class CheckedSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        common = set.intersection(*(set(filter_overrides(o)) for o in job_overrides))
        jobs = []
        for idx, overrides in enumerate(job_overrides):
            job = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            own = [o for o in filter_overrides(overrides) if o not in common]  # what this job's sweep values are
            jobs.append((f"#{initial_job_idx + idx} ({' '.join(own) or 'defaults'})", job_resources(job.hydra.launcher)))
        problem = differing(jobs)
        if problem:
            raise SweepResourcesError(problem)
        # All jobs agree: submit with their resources (the primary config may resolve to other ones).
        self.params = {**self.params, **jobs[0][1]}
        return super().launch(job_overrides, initial_job_idx)
