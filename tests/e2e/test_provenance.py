import subprocess

import pytest

from src.provenance import REPO, git_state, package_versions
from src.models.weights import weights_hash


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


def test_weights_hash_changes_with_the_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("STE_MODEL_CACHE", str(tmp_path / "cache"))
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


def test_weights_hash_is_the_same_whichever_way_each_digest_is_found(tmp_path, monkeypatch):
    """Computed, read from a verified manifest, or taken from a hub blob's name: the same bytes, the same hash."""
    import hashlib
    import os

    monkeypatch.setenv("STE_MODEL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "model-00001.safetensors").write_bytes(b"a" * 100)
    (model / "model-00002.safetensors").write_bytes(b"b" * 100)
    computed = weights_hash(model)
    sha = {n: hashlib.sha256((model / n).read_bytes()).hexdigest() for n in ("model-00001.safetensors", "model-00002.safetensors")}
    assert weights_hash(model, known=sha) == computed
    assert weights_hash(model, known={k: v[:20] for k, v in sha.items()}) == computed  # the stage cache keeps 20 digits
    # a hub snapshot: files are links to blobs/<sha256>
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name, digest in sha.items():
        (blobs / digest).write_bytes((model / name).read_bytes())
        os.symlink(blobs / digest, snap / name)
    assert weights_hash(snap) == computed
    # the manifest is trusted for what it says (it is verified before use): a different listed digest changes the hash
    assert weights_hash(model, known={**sha, "model-00001.safetensors": "0" * 64}) != computed


def test_file_digest_is_remembered_by_size_and_mtime(tmp_path):
    import json
    import os

    from src.models.weights import file_sha256

    f, memo = tmp_path / "w.safetensors", tmp_path / "memo.json"
    f.write_bytes(b"x" * 10)
    assert file_sha256(f, memo) and not memo.exists()  # just written: not remembered (a same-size rewrite could keep its stamp)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 60 * 10**9))
    real = file_sha256(f, memo)
    entry = json.loads(memo.read_text())[str(f.resolve())]
    assert entry["sha256"] == real and entry["stamp"][0] == 10
    # unchanged size and mtime: the remembered digest is used, the file is not read again
    memo.write_text(json.dumps({str(f.resolve()): {**entry, "sha256": "remembered"}}))
    assert file_sha256(f, memo) == "remembered"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten in place: reread
    assert file_sha256(f, memo) == real


def test_packaged_model_hash_comes_from_its_manifest_without_converting(tmp_path):
    """A converted packaged model is identified by its manifest (no 2.5 GB rehash, no conversion)."""
    import json

    from src.models.base import ModelSpec
    from src.models.packaged import materialized_dir
    from src.models.weights import model_weights

    d = materialized_dir("smollm2_135m", tmp_path)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"not really weights")
    (d / "ste_source.json").write_text(json.dumps({"files": {"model.safetensors": "ab" * 32, "config.json": "cd" * 32}}))
    path, digest = model_weights(ModelSpec(name="smollm2_135m", source="packaged", package="smollm2_135m"), tmp_path)
    assert path == d and digest == weights_hash(d, known={"model.safetensors": "ab" * 32})
    assert digest != weights_hash(d, known={"model.safetensors": "ef" * 32})


def test_train_output_digests_from_a_stage_manifest(tmp_path):
    from src.cache import manifest
    from src.models.weights import train_output_digests

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    meta = {"files": manifest(tmp_path)}
    known = train_output_digests(meta, "adapter")
    assert set(known) == {"adapter_model.safetensors", "adapter_config.json"}
    assert weights_hash(tmp_path / "adapter", known) == weights_hash(tmp_path / "adapter")
