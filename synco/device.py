"""Which torch device a run uses, and the process-wide CPU settings of a training process."""

from __future__ import annotations

import ctypes
import platform

import torch

from .errors import SyncoError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when visible; asking for CUDA (as every GPU preset does) without a usable GPU stops the
    run before any work, with the reason: never a silent CPU run of a GPU recipe."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SyncoError(f"device={name} (set by every GPU preset) needs a usable CUDA GPU, but {no_cuda_reason()}. "
                         "Nothing was started. Add device=cpu to run on the CPU anyway (a DeiT-S recipe there takes "
                         "months), or install a torch build that matches your NVIDIA driver (README, 'Installing "
                         "torch for your GPU'); `synco doctor` shows what this machine offers.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SyncoError(f"device={name!r} is not a torch device (use auto, cpu or cuda).") from None


def no_cuda_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False, as far as torch can tell."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return (f"this torch ({torch.__version__}) is built for CUDA {torch.version.cuda} and finds no usable GPU: no "
            "NVIDIA driver, no GPU visible (CUDA_VISIBLE_DEVICES), or a driver too old for CUDA "
            f"{torch.version.cuda}")


def environment(device: torch.device, world_size: int = 1) -> dict:
    """What a run ran on, for ``summary.json``: the device and its name, torch and CUDA versions, processes."""
    env = {"device": str(device), "device_name": cpu_name(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "world_size": int(world_size)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
        if torch.distributed.is_available() and torch.distributed.is_nccl_available():
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return env


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
