import subprocess

import pytest

from src.provenance import REPO, git_state, package_versions, weights_hash


def test_git_state_of_this_checkout():
    state = git_state()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert state["git.commit"] == head.stdout.strip()
    assert state["git.dirty"] in ("true", "false")


def test_git_state_outside_a_checkout(tmp_path):
    assert git_state(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}


def test_dirty_flag_follows_tracked_changes(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run(["git", "-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    assert git_state(tmp_path)["git.dirty"] == "false"
    (tmp_path / "untracked.txt").write_text("ignored")
    assert git_state(tmp_path)["git.dirty"] == "false"
    (tmp_path / "a.txt").write_text("2")
    assert git_state(tmp_path)["git.dirty"] == "true"


def test_package_versions_name_installed_packages_only():
    from importlib import metadata

    v = package_versions(("torch", "no-such-package-xyz"))
    assert v == {"version.torch": metadata.version("torch")}


def test_weights_hash_changes_with_the_weights_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "config.json").write_text("{}")
    h = weights_hash(tmp_path)
    (tmp_path / "config.json").write_text('{"x": 1}')
    assert weights_hash(tmp_path) == h
    (tmp_path / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 63)
    assert weights_hash(tmp_path) != h
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_hash(empty)
