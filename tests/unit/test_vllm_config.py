"""Configs vLLM would reject fail at config time (main env; no vllm needed), and the model cache does not trust
what it did not verify."""
import json

import pytest

from src.config import ConfigError
from src.models.base import SamplingConfig
from src.job import Job, check_lengths
from tests.conftest import TINY


def job(make_cfg, *overrides):
    return Job.from_config(make_cfg(*TINY, *overrides))


def test_greedy_judging_with_n_samples_is_rejected(make_cfg):
    with pytest.raises(ConfigError, match=r"judging\.n=3 with judging\.temperature=0"):
        job(make_cfg, "judging.n=3", "judging.temperature=0")
    job(make_cfg, "judging.n=1", "judging.temperature=0")  # greedy, one sample: fine


def test_greedy_majority_vote_is_rejected(make_cfg):
    with pytest.raises(ConfigError, match=r"eval\.rewardbench\.maj_k=5 with maj_temperature=0"):
        job(make_cfg, "eval.rewardbench.maj_k=5", "eval.rewardbench.maj_temperature=0")


@pytest.mark.parametrize("override,key", [
    ("judging.max_new_tokens=1024", r"judging\.max_new_tokens=1024"),
    ("eval.max_new_tokens=4096", r"eval\.max_new_tokens=4096"),
    ("negatives.answer_max_new_tokens=1020", r"negatives\.answer_max_new_tokens\+modify_max_new_tokens"),
])
def test_generation_longer_than_the_model_window_is_rejected(make_cfg, override, key):
    # the tiny model's max_model_len is 1024 (conf/model/tiny_random.yaml)
    with pytest.raises(ConfigError, match=key + r".*max_model_len 1024"):
        check_lengths(job(make_cfg, override))
    check_lengths(job(make_cfg))  # the defaults fit


def test_sampling_config_mirrors_vllm_sampling_params():
    with pytest.raises(ValueError, match="greedy"):
        SamplingConfig(max_new_tokens=8, temperature=0.0, n=2)
    with pytest.raises(ValueError, match=">= 1"):
        SamplingConfig(max_new_tokens=8, temperature=0.7, n=0)
    assert SamplingConfig(max_new_tokens=8, temperature=0.7, n=4).n == 4


# ------------------------------------------------------------------ model cache integrity
class _Saveable:
    """Stands in for a transformers model/tokenizer: save_atomically only calls save_pretrained."""

    def __init__(self, name, data):
        self.name, self.data = name, data

    def save_pretrained(self, d):
        (d / self.name).write_bytes(self.data)


def test_manifest_detects_planted_and_altered_files(tmp_path):
    from src.models.store import save_atomically, verify_manifest

    out = save_atomically(_Saveable("model.safetensors", b"w" * 100), _Saveable("tokenizer.json", b"{}"),
                          tmp_path / "m", {"packaged": "x", "sha256": "ab"})
    (out / "config.json").write_text("{}")  # a file the manifest does not list
    assert "extra ['config.json']" in verify_manifest(out, {"packaged": "x", "sha256": "ab"})
    (out / "config.json").unlink()
    assert verify_manifest(out, {"packaged": "x", "sha256": "ab"}) is None
    assert "sha256" in verify_manifest(out, {"packaged": "x", "sha256": "cd"})
    (out / "model.safetensors").write_bytes(b"v" * 100)  # same size, other bytes
    assert "SHA-256 of model.safetensors" in verify_manifest(out, {"packaged": "x", "sha256": "ab"})
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "config.json").write_text("{}")
    assert "no readable ste_source.json" in verify_manifest(planted, {})


def test_planted_converted_dir_is_set_aside_and_rebuilt(tmp_path, monkeypatch):
    """A directory at the converted copy's path that no verified conversion wrote is never loaded: materialize
    moves it aside and converts again (the conversion itself is the real code path, on a fake GGUF source that
    stands in for the 100 MB file: `locate_gguf` and the transformers loaders are replaced)."""
    from src.models import packaged

    name = "smollm2_135m"
    out = packaged.materialized_dir(name, tmp_path)
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"planted": true}')
    (out / "ste_source.json").write_text(json.dumps({"packaged": name, "sha256": packaged.get_packaged(name).sha256}))
    converted = []

    def fake_convert(n, cache_dir):  # what the real conversion leaves: a verified, manifested directory
        from src.models.store import save_atomically

        converted.append(n)
        return save_atomically(_Saveable("config.json", b'{"real": true}'), _Saveable("tokenizer.json", b"{}"),
                               packaged.materialized_dir(n, cache_dir), packaged._manifest_expect(n))

    monkeypatch.setattr(packaged, "_convert", fake_convert)
    got = packaged.materialize(name, tmp_path)
    assert converted == [name] and json.loads((got / "config.json").read_text()) == {"real": True}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".untrusted-")]
    assert len(aside) == 1 and (aside[0] / "config.json").read_text() == '{"planted": true}'
    assert packaged.materialize(name, tmp_path) == got and converted == [name], "a verified copy is reused"


def test_planted_assembled_gguf_is_not_trusted(tmp_path, monkeypatch):
    from tests.stages.test_models import _fake_split_package
    from src.models import packaged

    payload = [b"GGUF" + bytes(range(256)) * 50, b"second part" * 99]
    model = _fake_split_package(tmp_path / "site", payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake_split", model)
    target = tmp_path / "cache" / "gguf" / f"{model.sha256[:12]}-{model.filename}"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF planted weights")
    out = packaged.locate_gguf("fake_split", tmp_path / "cache")
    assert out == target and out.read_bytes() == b"".join(payload)
    assert [p.read_bytes() for p in target.parent.iterdir() if p.name.startswith(".untrusted-")] == [b"GGUF planted weights"]


def test_lora_slot_fits_the_adapters_rank(tmp_path):
    """vLLM pads every adapter to max_lora_rank: the backend asks for the smallest rank vLLM accepts that holds the
    adapter (peft's adapter_config.json), not a fixed 64."""
    from src.models.vllm_backend import lora_rank_slot

    for r, slot in ((8, 8), (12, 16), (64, 64), (300, 320)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16}))
        assert lora_rank_slot(tmp_path) == slot
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(ValueError, match="rank 1024 is over"):
        lora_rank_slot(tmp_path)
