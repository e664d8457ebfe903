"""Which torch device a run uses, and the process-wide CPU settings of a training process."""

from __future__ import annotations

import ctypes

import torch

from .errors import SyncoError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when visible; asking for CUDA without a GPU is a user error, not a traceback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SyncoError(f"device={name} was asked for but no CUDA GPU is visible; use device=cpu or device=auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SyncoError(f"device={name!r} is not a torch device (use auto, cpu or cuda).") from None


def use_bf16(precision: str, device: torch.device) -> bool:
    """``precision=auto`` means bf16 autocast on CUDA and fp32 elsewhere (CPUs without bf16 units run it slower)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def configure_cpu(threads: int) -> None:
    """Process-wide CPU settings of a training (or timed) process: ``threads > 0`` sets torch's intra-op threads
    (0 keeps torch's default), and the C allocator keeps freed memory (:func:`keep_freed_memory`)."""
    if threads > 0:
        torch.set_num_threads(threads)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    By default a freed block of a few MB (every activation of a step) is unmapped or trimmed off the heap and
    faulted in again, page by page, at the next step: about 13,000 page faults and 18 % of a 2-thread cpu-demo
    step (``benchmarks/bench_allocator.py``); blocks over 32 MB are always mapped afresh. With this, every block
    comes from the heap (mmap only if the heap cannot grow) and the heap is not shrunk until 2 GB of it is free:
    the process keeps its peak memory. Returns False where the C library has no ``mallopt`` (macOS) and nothing
    was changed; musl accepts and ignores it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    no_new_maps = mallopt(m_mmap_max, 0)
    kept_heap = mallopt(m_trim_threshold, 2**31 - 1)
    return bool(no_new_maps and kept_heap)
