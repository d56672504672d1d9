"""Model access: the `Generator` interface (base.py), its CPU (hf.py) and GPU (vllm_backend.py)
implementations, the packaged CPU models (packaged.py), the tiny test model (tiny.py) and the loaders
(loading.py). Heavy imports (torch, transformers, vllm) happen inside those modules, not here."""
