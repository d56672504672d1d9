"""A tiny random-weights Llama with a self-contained tokenizer: no download, no packaged model.

Used by the tests and the `tiny_random` model preset to check mechanics (batching, seeding, adapters,
stage plumbing) in seconds. Its outputs are gibberish by design. Deterministic: the same files every build.
"""
from __future__ import annotations

from pathlib import Path

from src.models.store import default_cache_dir, save_atomically

TINY_NAME = "tiny_random_v2"  # bump when the recipe below changes (v2: 2 key/value heads)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_CORPUS = """
Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants
to the user question displayed below. You should choose the assistant that follows the user's instructions
and answers the user's question better. Your evaluation should consider factors such as the helpfulness,
relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by
comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the
order in which the responses were presented does not influence your decision. Do not allow the length of
the responses to influence your evaluation. Be as objective as possible. After providing your explanation,
output your final verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if
assistant B is better.
[User Question] [The Start of Assistant A's Answer] [The End of Assistant A's Answer]
[The Start of Assistant B's Answer] [The End of Assistant B's Answer] [[A]] [[B]] [[C]]
Write a function that returns the sum of a list of numbers. def total(xs): return sum(xs)
The capital of France is Paris. The capital of Germany is Berlin. Water boils at 100 degrees Celsius.
Explain why the sky is blue in one paragraph. Sunlight is scattered by the molecules of the air, and blue
light is scattered more than red light because it has a shorter wavelength.
Classify the following instruction into one of these categories: coding, math, reasoning, writing,
knowledge, safety, other. Category: coding. Category: math. Category: reasoning. Category: writing.
Given the instruction above, write a modified version that is similar but asks for something different,
so that a good answer to the original would be a worse answer to the new one.
1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14 0.5 -1 x = y + z; for i in range(10): print(i)
import numpy as np; import torch; class Model: pass; if __name__ == "__main__": main()
Q: What is 12 times 7? A: 12 times 7 is 84. Q: Is 17 a prime number? A: Yes, 17 is prime.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Thank you! I'm sorry, but I can't help with that. Sure, here is a short poem about autumn leaves.
""".strip()


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines()
    tk.train_from_iterator(lines * 3, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=1024,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_random(cache_dir: str | Path | None = None) -> Path:
    """Build (once) and return the directory of the tiny random model: cache_dir/TINY_NAME."""
    out = Path(cache_dir or default_cache_dir()) / TINY_NAME
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like the real models
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng: building the model must not disturb the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config).to(torch.float32)
        # default init (std 0.02) gives near-uniform next-token distributions; widen the output layer so
        # sampling vs greedy, seeds and LoRA deltas produce visibly different texts
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    save_atomically(model, tok, out)
    return out
