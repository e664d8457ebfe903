"""`synco doctor`: the environment a run of a preset would get here, and (``--bench``) how fast it trains.

What it reports, each part guarded so that one failing probe never hides the others:

* versions: Python, torch (and the CUDA and cuDNN it was built with), torchvision, timm, synco;
* the NVIDIA driver: its version (``nvidia-smi``), and the newest CUDA it supports (``cuDriverGetVersion`` from
  ``libcuda``): a driver older than the CUDA of the torch wheel is the usual reason a GPU machine has no CUDA;
* the GPUs: name, memory, compute capability, whether this torch has kernels for it, native bf16, and the
  datasheet peak the MFU of ``--bench`` is stated against (``meters.GPU_PEAKS``);
* NCCL: in this torch and usable (it needs CUDA);
* attention: which scaled-dot-product kernels torch allows, whether the preset's timm backbone calls them at
  all (timm's ``fused_attn``; its Swin keeps them off by default), and which kernel one call at the backbone's
  attention shape actually dispatches to on the run's device, in the run's precision;
* free ``/dev/shm`` (DataLoader workers hand batches over through it), usable CPU cores and cores per GPU;
* whether the preset would run here: a GPU preset (``imagenet`` in its name) with no usable CUDA stops before
  any work, and ``device=cpu`` forces the CPU.

``--bench`` runs the trainer's own step (``synco.engine.step.train_step``, through the measurement code of
``synco eval efficiency``) on random inputs of the preset's shapes (with ``data.augment.on=device``, random uint8
crops made into the views on the device each step): images/s, step time (median of the timed
steps), peak memory, FLOPs per step and MFU against the datasheet peak. A GPU preset on a CPU is measured at a
small batch instead, and the output says so.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__
from ..device import configure_cpu, cpu_name, no_cuda_reason, resolve_device, use_bf16
from ..errors import SyncoError
from ..io import atomic_write_text, check_output_dir
from . import meters
from .efficiency import EfficiencyOptions, device_name, load_bench_config, measure_method, refuse_distributed

# Below this, workers' batches may not fit in shared memory (Docker gives a container 64 MB by default).
SHM_WARN_BYTES = 2**30
# A GPU preset measured on a CPU: a shape that takes well under a minute on two cores (DeiT-S at 224 px).
CPU_FALLBACK_BATCH, CPU_FALLBACK_STEPS, CPU_FALLBACK_WARMUP = 8, 2, 1


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
# --bench: a short training at the preset's shapes, through the trainer's step


def _bench_config(preset: str, overrides: list[str], batch_size: Optional[int]):
    """(config, device, fallback note or None, the preset's own batch) of the bench. A GPU preset on a CPU
    (no usable GPU, or device=cpu) is measured at a small batch, and the note says so: never a CPU number
    passed off as the preset's."""
    cfg = load_bench_config(preset, overrides)
    try:
        device = resolve_device(cfg.device)
    except SyncoError:
        if torch.cuda.is_available():
            raise
        device = torch.device("cpu")
    fallback = device.type == "cpu" and is_gpu_preset(preset)
    extra = ["device=cpu"] if fallback else []
    batch = batch_size if batch_size is not None else (CPU_FALLBACK_BATCH if fallback else None)
    if batch is not None:
        extra.append(f"optim.batch_size={batch}")
    bench_cfg = load_bench_config(preset, list(overrides) + extra)
    note = None
    if fallback:
        why = "device=cpu forces the CPU" if cfg.device == "cpu" else "there is no usable CUDA GPU here"
        note = (f"CPU fallback: {preset} is a GPU preset and {why}; measured on the CPU at batch "
                f"{bench_cfg.optim.batch_size} (the preset's: {cfg.optim.batch_size} per GPU) at "
                f"{bench_cfg.data.image_size} px. These are CPU numbers at a small batch, not the preset's on a GPU.")
    return bench_cfg, device, note, cfg.optim.batch_size


def check_bench_options(steps: Optional[int], warmup_steps: Optional[int], batch_size: Optional[int]) -> None:
    for flag, value, least in (("--steps", steps, 1), ("--warmup-steps", warmup_steps, 0),
                               ("--batch-size", batch_size, 1)):
        if value is not None and value < least:
            raise SyncoError(f"{flag} must be >= {least}, got {value}.")


def bench(preset: str, overrides: list[str], steps: Optional[int] = None, warmup_steps: Optional[int] = None,
          batch_size: Optional[int] = None) -> dict:
    """Time the trainer's step (``measure_method`` of ``synco eval efficiency``) on random inputs of the preset's
    shapes, with the preset's threads, precision and compile, and report it at the median step."""
    refuse_distributed("synco doctor --bench")
    cfg, device, note, preset_batch = _bench_config(preset, overrides, batch_size)
    fallback = note is not None
    check_bench_options(steps, warmup_steps, batch_size)
    steps = steps if steps is not None else (CPU_FALLBACK_STEPS if fallback else 10)
    warmup_steps = warmup_steps if warmup_steps is not None else (CPU_FALLBACK_WARMUP if fallback else 3)
    inputs = "views" if cfg.data.augment.on == "device" else "random"  # the device's share of the views, timed
    opts = EfficiencyOptions(preset=preset, methods=[cfg.method], steps=steps, warmup_steps=warmup_steps,
                             seed=cfg.seed, inputs=inputs, flops=True, flops_by_part=False)
    probe = meters.MemoryProbe(device)
    threads = torch.get_num_threads()
    try:
        configure_cpu(cfg.threads)  # as the trainer: the preset's threads
        bench_threads = torch.get_num_threads()
        row = measure_method(cfg, opts, device, probe)
    finally:
        torch.set_num_threads(threads)
    median_s = row["step_ms_median"] / 1000.0
    achieved = row["flops_per_step"] / median_s
    sheet = row["datasheet"]
    label = device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()}, {os.cpu_count()} cores)"
    return {"preset": preset, "method": cfg.method, "backbone": cfg.model.backbone, "device": label,
            "cpu_fallback": fallback, "note": note, "preset_batch_size": preset_batch,
            "batch_size": cfg.optim.batch_size, "image_size": cfg.data.image_size, "precision": row["precision"],
            "compile": row["compile"], "synthetic_negatives": row["synthetic"], "inputs": inputs,
            "threads": bench_threads if device.type == "cpu" else None, "steps": steps,
            "warmup_steps": row["warmup_steps"], "step_ms_median": row["step_ms_median"],
            "step_ms_mean": row["step_ms"],
            "images_per_second": cfg.optim.batch_size / median_s, "peak_memory_mb": row["peak_mem_mb"],
            "memory_kind": probe.kind, "flops_per_step": row["flops_per_step"], "achieved_flops_per_s": achieved,
            "compute_dtype": row["compute_dtype"], "datasheet": sheet,
            "mfu": achieved / sheet["peak_flops_per_s"] if sheet else None,
            "matmul_shape": row["matmul_shape"], "matmul_flops_per_s": row["matmul_flops_per_s"],
            "matmul_threads": row["matmul_threads"],
            "matmul_utilization": achieved / row["matmul_flops_per_s"], "measurement": row}


# ---------------------------------------------------------------------------------------------
# The report


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


def check_json_path(path) -> Path:
    """Refuse an unwritable ``--json`` place before any work (its folder is created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise SyncoError(f"--json '{path}' is a folder; give a file name, e.g. {path / 'doctor.json'}.")
    check_output_dir(path.parent, "--json folder")
    return path


def run_doctor(preset: str = "cpu-demo", overrides: Optional[list[str]] = None, bench_run: bool = False,
               json_path: Optional[str] = None, steps: Optional[int] = None, warmup_steps: Optional[int] = None,
               batch_size: Optional[int] = None, log: Callable[[str], None] = print) -> dict:
    overrides = list(overrides or [])
    target = check_json_path(json_path) if json_path else None
    cfg = load_bench_config(preset, overrides)  # an unknown preset or a bad key=value stops here
    if not bench_run and (steps, warmup_steps, batch_size) != (None, None, None):
        raise SyncoError("--steps, --warmup-steps and --batch-size set the --bench run; add --bench.")
    check_bench_options(steps, warmup_steps, batch_size)
    report = environment(preset, cfg)
    if bench_run:
        report["bench"] = bench(preset, overrides, steps, warmup_steps, batch_size)
    log(render(report))
    if target is not None:
        atomic_write_text(json.dumps(report, indent=2, default=str) + "\n", target)
    return report


# ---------------------------------------------------------------------------------------------
# The report in words


def _yes(flag) -> str:
    return "yes" if flag else "no"


def _failed(section) -> Optional[str]:
    return f"probe failed ({section['error']})" if isinstance(section, dict) and "error" in section else None


def _cuda_tuple(version: Optional[str]) -> tuple:
    try:
        return tuple(int(x) for x in str(version).split(".")[:2])
    except ValueError:
        return ()


def _versions_text(v: dict) -> str:
    arch = " ".join(v["cuda_arch_list"]) or "none"
    build = f"built for CUDA {v['cuda_build']}, cuDNN {v['cudnn']}; kernels for {arch}" if v["cuda_build"] else \
        "a CPU-only build"
    return (f"Python {v['python']}, torch {v['torch']} ({build}), torchvision {v['torchvision']}, "
            f"timm {v['timm']}, synco {v['synco']}")


def _driver_text(d: dict, cuda_build: Optional[str]) -> str:
    if not d["found"]:
        return "no NVIDIA driver found (no nvidia-smi on PATH, no loadable libcuda.so.1)"
    text = f"{d['version'] or 'version unknown'}"
    if d["supports_cuda"]:
        text += f", supports CUDA up to {d['supports_cuda']}"
        if cuda_build and _cuda_tuple(d["supports_cuda"]) < _cuda_tuple(cuda_build):
            text += (f": older than this torch's CUDA {cuda_build}. Update the driver, or install a torch built for "
                     f"CUDA {d['supports_cuda']} or older")
    return text


def _gpu_lines(g: dict) -> list[str]:
    if not g["usable"]:
        return [f"none usable: {g['reason']}"]
    lines = []
    for d in g["devices"]:
        sheet, fp32 = d["datasheet_bf16"], d["datasheet_fp32"]
        peaks = (f"datasheet {(sheet or fp32)['gpu']}: dense bf16 {sheet['tflops'] if sheet else 'n/a'}, fp32 "
                 f"{fp32['tflops']} TFLOPS" if fp32 else "not in the datasheet table: MFU n/a")
        lines.append(f"{d['index']}: {d['name']}, {d['memory_gib']:.1f} GiB ({d['free_gib']:.1f} free), compute "
                     f"capability {d['compute_capability']}, {d['multiprocessors']} SMs, bf16 {_yes(d['bf16'])}, "
                     f"kernels in this torch {_yes(d['kernels_in_this_torch'])}; {peaks}")
    return lines


def _attention_text(a: dict) -> str:
    allowed = ", ".join(f"{k.replace('_', '-')} {_yes(v)}" for k, v in a["sdp_enabled"].items())
    if not a.get("attention_modules"):
        return f"{a['backbone']}: no timm attention blocks found; torch allows SDPA kernels: {allowed}"
    text = (f"{a['backbone']}: {a['fused_modules']} of {a['attention_modules']} attention blocks call "
            f"F.scaled_dot_product_attention (timm fused_attn); {a['heads']} heads x {a['head_dim']}, "
            f"{a['tokens']} tokens")
    if a.get("kernel_probe"):
        text += f"; on {a['kernel_probe']} that runs {a['kernel']}"
    elif a["kernel"]:
        text += f"; {a['kernel']}"
    else:
        text += "; no kernel probed: the run would stop"
    return f"{text}. torch allows: {allowed}"


def _cpu_text(c: dict) -> str:
    per_gpu = f"{c['cores_per_gpu']:.1f} cores per GPU" if c["cores_per_gpu"] else "no GPU: cores per GPU n/a"
    return (f"{c['usable']} usable cores of {c['total']}, {c['name']}; {per_gpu}; the preset's DataLoader "
            f"workers: {c['preset_workers_per_process']} per process")


def _shm_text(s: dict) -> str:
    if s["free_gib"] is None:
        return f"{s['path']} not found"
    text = f"{s['free_gib']:.1f} GiB free of {s['total_gib']:.1f} GiB"
    if s["low"]:
        text += (": low. DataLoader workers hand batches over through it; give a container more "
                 "(docker run --shm-size=16g, or --ipc=host)")
    return text


def _run_text(r: dict) -> str:
    return f"{r['preset']} (device={r['device_setting']}, precision={r['precision_setting']}): {r['verdict']}"


def _threads(n: Optional[int]) -> str:
    return "" if n is None else f", {n} thread{'' if n == 1 else 's'}"


def _bench_lines(b: dict) -> list[str]:
    threads = _threads(b["threads"])
    lines = [f"{b['method']} / {b['backbone']} at {b['image_size']} px, batch {b['batch_size']}, {b['precision']}, "
             f"{'compiled' if b['compile'] else 'eager'}{threads} on {b['device']}; "
             + ("random uint8 crops made into both views on the device (data.augment.on=device), then"
                if b.get("inputs") == "views" else "random inputs through")
             + " the trainer's step (synco.engine.step.train_step)"]
    if b["note"]:
        lines.append(b["note"])
    lines.append(f"{b['steps']} timed step{'' if b['steps'] == 1 else 's'} after {b['warmup_steps']} warm-up "
                 "(and 1 whose FLOPs were counted): "
                 f"step {b['step_ms_median']:.1f} ms median (mean {b['step_ms_mean']:.1f}), "
                 f"{b['images_per_second']:,.1f} images/s")
    lines.append(f"peak memory {b['peak_memory_mb']:,.0f} MB ({b['memory_kind']}); "
                 f"{b['flops_per_step'] / 1e9:,.2f} GFLOP per step, {b['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s "
                 "at the median step")
    sheet = b["datasheet"]
    if sheet:
        lines.append(f"MFU {100 * b['mfu']:.1f}% of the {sheet['gpu']} datasheet's dense {sheet['dtype']} peak "
                     f"({sheet['tflops']:g} TFLOPS; {sheet['source']})")
    elif b["device"].startswith("cpu"):
        lines.append("MFU n/a: a CPU has no datasheet peak (its rate depends on the cores, vector units and clocks "
                     "it is given)")
    else:
        lines.append(f"MFU n/a: {b['device']} in {b['compute_dtype']} is not in the datasheet table "
                     "(synco.eval.meters.GPU_PEAKS)")
    lines.append(f"on-the-spot {b['matmul_shape']} matmul (timed here{_threads(b['matmul_threads'])}; not a "
                 f"datasheet): {b['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s; the step reaches "
                 f"{100 * b['matmul_utilization']:.0f}% of it")
    return lines


def render(report: dict) -> str:
    """The report as the terminal shows it: one labelled line (or a few) per section."""
    v = report["versions"]
    sections = [
        ("versions", lambda: [_versions_text(v)], v),
        ("driver", lambda: [_driver_text(report["driver"], v.get("cuda_build"))], report["driver"]),
        ("GPUs", lambda: _gpu_lines(report["gpus"]), report["gpus"]),
        ("NCCL", lambda: [_nccl_text(report["nccl"])], report["nccl"]),
        ("attention", lambda: [_attention_text(report["attention"])], report["attention"]),
        ("/dev/shm", lambda: [_shm_text(report["shm"])], report["shm"]),
        ("CPU", lambda: [_cpu_text(report["cpu"])], report["cpu"]),
        ("run", lambda: [_run_text(report["run"])], report["run"]),
    ]
    if "bench" in report:
        sections.append(("bench", lambda: _bench_lines(report["bench"]), report["bench"]))
    out = [f"synco doctor: what a run of {report['preset']} would get on this machine"]
    for label, lines, section in sections:
        failed = _failed(section)
        for i, line in enumerate([failed] if failed else lines()):
            out.append(f"  {label if i == 0 else '':<10} {line}")
    return "\n".join(out)


def _nccl_text(n: dict) -> str:
    if not n["in_this_torch"]:
        return "not in this torch: a multi-GPU run (synco uses NCCL on GPUs) cannot start"
    usable = "usable" if n["usable"] else "not usable here (it needs a CUDA GPU)"
    return f"{n['version']} in this torch; {usable}"
