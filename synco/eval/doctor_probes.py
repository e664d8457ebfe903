"""The probes of `synco doctor` (see doctor.py): what this machine offers a run, each one guarded so that one
failing probe never hides the others."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from typing import Callable, Optional

import torch

from .. import __version__
from ..device import cpu_name, no_cuda_reason, resolve_device, use_bf16
from ..errors import SyncoError
from . import meters
from .efficiency import device_name, load_bench_config

# Below this, workers' batches may not fit in shared memory (Docker gives a container 64 MB by default).
SHM_WARN_BYTES = 2**30


def is_gpu_preset(preset: str) -> bool:
    """A recipe written for GPUs: the preset (or a YAML built on one with ``base:``) asks for ``device: cuda``, as
    every ImageNet and ImageNet-100 preset does. Decided from the config, not the name; False when it cannot load."""
    try:
        return load_bench_config(preset, []).device == "cuda"
    except SyncoError:
        return False


def _guard(probe: Callable[[], object]) -> object:
    """One probe's answer, or its failure in words: a doctor reports a broken part, it does not crash on it."""
    try:
        return probe()
    except Exception as e:  # noqa: BLE001 - any failure of a probe is a finding to report
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def versions() -> dict:
    import timm
    import torchvision

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cudnn": None if cudnn is None else _cudnn_version(cudnn), "torchvision": torchvision.__version__,
            "timm": timm.__version__, "synco": __version__,
            "cuda_arch_list": torch.cuda.get_arch_list() if torch.version.cuda else []}


def _cudnn_version(n: int) -> str:
    """cuDNN 9 numbers itself major * 10000 + minor * 100 + patch (92400: 9.24.0); cuDNN 8 major * 1000 + ..."""
    major_unit = 10000 if n >= 90000 else 1000
    return f"{n // major_unit}.{n % major_unit // 100}.{n % 100}"


def _version_number(n: int) -> str:
    """CUDA's integer versions (12040) as 12.4."""
    return f"{n // 1000}.{(n % 1000) // 10}"


def driver() -> dict:
    """The driver's version from nvidia-smi, and the newest CUDA it supports from libcuda itself (which needs no
    GPU context). torch builds without ``_cuda_getDriverVersion`` are covered by libcuda."""
    out: dict = {"version": None, "supports_cuda": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            run = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=False)
            lines = run.stdout.strip().splitlines()
            out["version"] = lines[0].strip() if run.returncode == 0 and lines else None
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        get = ctypes.CDLL("libcuda.so.1").cuDriverGetVersion
        n = ctypes.c_int(0)
        if get(ctypes.byref(n)) == 0:
            out["supports_cuda"] = _version_number(n.value)
    except (OSError, AttributeError):
        get_version = getattr(torch._C, "_cuda_getDriverVersion", None)
        if get_version is not None and torch.cuda.is_available():
            out["supports_cuda"] = _version_number(int(get_version()))
    out["found"] = out["version"] is not None or out["supports_cuda"] is not None
    return out


def gpus() -> dict:
    """Usable CUDA GPUs with what a run needs to know of each."""
    if not torch.cuda.is_available():
        return {"usable": False, "reason": no_cuda_reason(), "devices": []}
    arch = torch.cuda.get_arch_list()
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        devices.append({
            "index": i, "name": p.name, "memory_gib": total / 2**30, "free_gib": free / 2**30,
            "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
            "kernels_in_this_torch": has_kernels(arch, p.major, p.minor),
            "bf16": p.major >= 8,  # native bf16 tensor cores, as torch.cuda.is_bf16_supported() tests them
            "datasheet_bf16": meters.datasheet_peak(p.name, "bf16"),
            "datasheet_fp32": meters.datasheet_peak(p.name, "fp32")})
    return {"usable": True, "reason": None, "devices": devices, "bf16_supported": torch.cuda.is_bf16_supported()}


def has_kernels(arch_list: list[str], major: int, minor: int) -> bool:
    """Whether a torch built for ``arch_list`` (``torch.cuda.get_arch_list()``) runs on a GPU of compute
    capability major.minor: machine code of the same major version and a minor up to its own (binary
    compatible), or PTX of any older one, which the driver compiles."""
    cc = major * 10 + minor
    for a in arch_list:
        kind, _, num = a.partition("_")
        if not num.isdigit():  # sm_90a and the like: arch-specific code that runs on exactly that arch
            if kind == "sm" and num[:-1].isdigit() and int(num[:-1]) == cc:
                return True
            continue
        if (kind == "sm" and int(num) // 10 == major and int(num) <= cc) or (kind == "compute" and int(num) <= cc):
            return True
    return False


def nccl() -> dict:
    import torch.distributed as dist

    built = dist.is_available() and dist.is_nccl_available()
    version = None
    if built:
        v = torch.cuda.nccl.version()
        version = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {"in_this_torch": built, "version": version, "usable": built and torch.cuda.is_available()}


# ---------------------------------------------------------------------------------------------
# Attention kernels

# The aten kernels F.scaled_dot_product_attention dispatches to, as a user would name them.
SDPA_KERNELS = (("_scaled_dot_product_flash_attention_for_cpu", "CPU flash attention"),
                ("_scaled_dot_product_flash_attention", "flash attention"),
                ("_scaled_dot_product_efficient_attention", "memory-efficient attention"),
                ("_scaled_dot_product_cudnn_attention", "cuDNN attention"),
                ("_scaled_dot_product_fused_attention_overrideable", "a backend's fused attention"))


def attention_shape(model_cfg) -> dict:
    """The backbone's attention: how many blocks call ``F.scaled_dot_product_attention`` (timm's ``fused_attn``),
    heads, head size and tokens per attention (the window for Swin). Built on the meta device: no weights."""
    from ..models.backbone import backbone_from_config

    try:
        with torch.device("meta"):
            model = backbone_from_config(model_cfg)
    except (RuntimeError, NotImplementedError):  # an op without a meta kernel: build it for real
        model = backbone_from_config(model_cfg)
    attn = [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "num_heads")]
    if not attn:
        return {"backbone": model_cfg.backbone, "attention_modules": 0}
    first = attn[0]
    heads = int(first.num_heads)
    head_dim = getattr(first, "head_dim", None) or first.qkv.out_features // 3 // heads
    tokens = getattr(first, "window_area", None)
    patch = getattr(model, "patch_embed", None)
    if tokens is None and getattr(patch, "num_patches", None):
        tokens = patch.num_patches + int(getattr(model, "num_prefix_tokens", 0))
    return {"backbone": model_cfg.backbone, "attention_modules": len(attn),
            "fused_modules": sum(bool(m.fused_attn) for m in attn), "heads": heads, "head_dim": int(head_dim),
            "tokens": int(tokens) if tokens else None}


def sdpa_kernel(device: torch.device, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> str:
    """The kernel one training-mode ``F.scaled_dot_product_attention`` call of this shape dispatches to here."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    with Record() as rec:
        F.scaled_dot_product_attention(q, k, v)
    for op, label in SDPA_KERNELS:
        if any(f"aten.{op}." in name for name in rec.ops):
            return label
    return "math (unfused matmul + softmax)"


def attention(model_cfg, device: Optional[torch.device], bf16: bool) -> dict:
    from timm.layers import use_fused_attn

    out = {"sdp_enabled": {k: bool(getattr(torch.backends.cuda, f"{k}_sdp_enabled")())
                           for k in ("flash", "mem_efficient", "cudnn", "math")},
           "timm_fused_attn": use_fused_attn(), "timm_fused_attn_experimental": use_fused_attn(experimental=True),
           **attention_shape(model_cfg), "kernel": None}
    if not out.get("fused_modules"):
        out["kernel"] = "none: timm computes this backbone's attention as explicit matmul + softmax (fused_attn off)"
    elif device is not None and out.get("tokens"):
        dtype = torch.bfloat16 if bf16 else torch.float32
        out["kernel"] = sdpa_kernel(device, out["heads"], out["tokens"], out["head_dim"], dtype)
        out["kernel_probe"] = f"{device.type}, {str(dtype).replace('torch.', '')}"
    return out


# ---------------------------------------------------------------------------------------------
# Host: shared memory, cores; and whether the preset runs here


def shared_memory(path: str = "/dev/shm") -> dict:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return {"path": path, "free_gib": None, "total_gib": None, "low": None}
    return {"path": path, "free_gib": usage.free / 2**30, "total_gib": usage.total / 2**30,
            "low": usage.free < SHM_WARN_BYTES}


def cpu_cores(n_gpus: int, cfg) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))  # what this process may run on (taskset, cgroups' cpusets)
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    per_gpu = usable / n_gpus if n_gpus else None
    return {"name": cpu_name(), "usable": usable, "total": os.cpu_count(), "gpus": n_gpus,
            "cores_per_gpu": per_gpu, "torch_threads": torch.get_num_threads(),
            "preset_workers_per_process": cfg.data.num_workers}


def preset_verdict(preset: str, cfg) -> dict:
    """Where a run of the preset would run here, or why it would stop before any work."""
    gpu_preset = is_gpu_preset(preset)
    try:
        device = resolve_device(cfg.device)
        why = None
    except SyncoError as e:
        device, why = None, str(e)
    precision = None if device is None else ("bf16" if use_bf16(cfg.precision, device) else "fp32")
    if device is None:
        short = "no usable CUDA GPU (see GPUs)" if gpu_preset or str(cfg.device).startswith("cuda") else why
        text = f"would stop before any work (exit 2): {short}. Add device=cpu to force the CPU."
    elif gpu_preset and device.type == "cpu":
        verb = "forces" if cfg.device == "cpu" else "allows"
        text = f"runs on the CPU in {precision}, because device={cfg.device} {verb} it: a GPU recipe, far slower there"
    else:
        text = f"runs on {device_name(device) if device.type == 'cuda' else 'the CPU'} in {precision}"
    return {"preset": preset, "gpu_preset": gpu_preset, "device_setting": cfg.device,
            "precision_setting": cfg.precision, "device": None if device is None else str(device),
            "precision": precision, "would_stop": device is None, "reason": why, "verdict": text}


# ---------------------------------------------------------------------------------------------
# Every probe, for the report


def environment(preset: str, cfg) -> dict:
    """Everything but the bench; each section is its probe's answer or ``{"error": ...}``."""
    verdict = _guard(lambda: preset_verdict(preset, cfg))
    run_device = torch.device(verdict["device"]) if verdict.get("device") else None
    bf16 = verdict.get("precision") == "bf16"
    gpu = _guard(gpus)
    n_gpus = len(gpu.get("devices", []))
    return {"preset": preset, "versions": _guard(versions), "driver": _guard(driver), "gpus": gpu,
            "nccl": _guard(nccl), "attention": _guard(lambda: attention(cfg.model, run_device, bf16)),
            "shm": _guard(shared_memory), "cpu": _guard(lambda: cpu_cores(n_gpus, cfg)), "run": verdict}
