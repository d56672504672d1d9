"""GPU memory handed between stages: what a closed engine leaves cached, and the wait until its memory is free.

A vLLM engine's weights and KV cache live in its engine core process(es); shutting the engine down ends them, and
the driver frees their memory shortly after, not at once. The next engine refuses to start while a device has less
than gpu_memory_utilization x total free (vllm/v1/worker/utils.py `request_memory`), so the pool waits for it.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

GIB = 2**30
FREE_TIMEOUT_S = 120.0  # engine core processes exit within seconds; a device still held after this is held by someone else
POLL_S = 0.5


def wait_for_free_memory(mem_get_info: Callable[[int], tuple[int, int]], devices: Sequence[int], fraction: float,
                         timeout_s: float = FREE_TIMEOUT_S, poll_s: float = POLL_S,
                         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll until every device in `devices` has at least `fraction` of its memory free; raise RuntimeError naming
    the first device that does not within `timeout_s`. `mem_get_info(device) -> (free, total)` bytes is
    torch.cuda.mem_get_info on a GPU; the tests pass a fake that stands in for one (and a fake clock)."""
    deadline = clock() + timeout_s
    for d in devices:
        while True:
            free, total = mem_get_info(d)
            if free >= fraction * total:
                break
            if clock() >= deadline:
                raise RuntimeError(
                    f"GPU {d}: {free / GIB:.1f} of {total / GIB:.1f} GiB free {timeout_s:.0f} s after the engines were "
                    f"closed; the next engine or the trainer needs {fraction:.2f} x total = {fraction * total / GIB:.1f} GiB "
                    f"(gpu_memory_utilization): another process holds it (nvidia-smi)")
            sleep(poll_s)


def clear_cublas_workspaces() -> None:
    """Hand cuBLAS's workspaces back, then the cache they return to: torch.cuda.empty_cache() alone keeps them
    (they stay allocated, one per handle and stream, for the life of the process)."""
    import torch

    if not torch.cuda.is_available():
        return
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # a private torch function, in torch >= 1.13
    if clear is not None:
        clear()
    torch.cuda.empty_cache()


def wait_until_gpus_free(fraction: float, timeout_s: float = FREE_TIMEOUT_S) -> None:
    """`wait_for_free_memory` on every visible CUDA device; nothing to wait for without one."""
    import torch

    if not torch.cuda.is_available():
        return
    wait_for_free_memory(torch.cuda.mem_get_info, range(torch.cuda.device_count()), fraction, timeout_s)
