"""Model access: the `Generator` interface (base.py), its implementations on transformers (hf.py: the reference,
CPU or one GPU), llama.cpp (llamacpp.py: the CPU engine, with gguf_lora.py for trained adapters) and vLLM
(vllm_backend.py: GPUs), the packaged CPU models (packaged.py), the tiny test model (tiny.py) and the loaders
(loading.py). Heavy imports (torch, transformers, llama_cpp, vllm) happen inside those modules, not here."""
