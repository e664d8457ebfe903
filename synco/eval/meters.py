"""Meters for one training step: peak memory, FLOPs, the datasheet peak of known GPUs (for MFU), the matmul rate
the hardware reaches on the spot, and where the step's wall time goes. ``synco eval efficiency`` and
``synco doctor --bench`` read them around the trainer's own step."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils import flop_counter

# ---------------------------------------------------------------------------------------------
# Memory probes


def _proc_status_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    kb = _proc_status_kb("VmRSS")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB; a lifetime peak
    return kb / 1024.0


class MemoryProbe:
    """Peak memory within one step: CUDA allocated bytes, or the process's resident set on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.hwm = (not self.cuda) and _proc_status_kb("VmHWM") is not None and _reset_peak_rss()
        self.kind = ("cuda max_memory_allocated" if self.cuda else
                     "process peak RSS (VmHWM)" if self.hwm else "process RSS after step")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.hwm:
            _reset_peak_rss()

    def stop(self) -> float:
        """MB used at the peak of the step."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.hwm:
            return _proc_status_kb("VmHWM") / 1024.0
        return rss_mb()


# ---------------------------------------------------------------------------------------------
# FLOPs, the matmul peak, and where a step goes


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _flop_mapping() -> dict:
    """torch counts the CUDA attention kernels but not the CPU one (``F.scaled_dot_product_attention`` on CPU):
    count it with the same formulas."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}


def count_flops(fn: Callable[[], object]) -> tuple[int, dict]:
    """FLOPs of ``fn()`` (matrix products, convolutions, attention; 2 per multiply-add) and their split by module,
    as ``torch.utils.flop_counter.FlopCounterMode`` counts them: (total, {module path: flops}), where a module's
    count includes its submodules' and the backward of its forward."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as mode:
        fn()
    per_module = {name: int(sum(ops.values())) for name, ops in mode.get_flop_counts().items()}
    return int(mode.get_total_flops()), per_module


def flops_by_part(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor, total: int, bf16: bool) -> dict:
    """A step's FLOPs split into the online encoder (forward + backward), the target (forward) and the rest (loss,
    queue similarities and synthetic negatives, with their backward). The encoders are counted apart, on the same
    views: FLOPs depend on shapes only, so a backward from a stand-in loss counts what the step's backward does.
    These passes run in train mode, so they move BatchNorm statistics like one more step would: call it before
    the warm-up steps, never between measured ones."""

    def online() -> None:
        with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=bf16):
            q1, q2 = model.online(x1, x2)
        (q1.float().sum() + q2.float().sum()).backward()

    online_flops, _ = count_flops(online)
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=bf16):
        target_flops, _ = count_flops(lambda: model.target(x1, x2))
    return {"online": online_flops, "target": target_flops, "loss and negatives": total - online_flops - target_flops}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 0, repeats: int = 5) -> dict:
    """FLOP/s of a ``size`` x ``size`` matmul in ``dtype`` on ``device`` with the current threads (median of
    ``repeats`` after one warm-up), timed here and now. MFU is stated against the datasheet peak
    (:func:`datasheet_peak`); this rate is the secondary yardstick, and the only one on a CPU or an unknown GPU."""
    size = size or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    out = torch.empty_like(a)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    name = str(dtype).replace("torch.", "")
    return {"matmul_flops_per_s": 2.0 * size**3 / seconds, "matmul_shape": f"{size}^3 {name}",
            "matmul_threads": torch.get_num_threads() if device.type == "cpu" else None}


# ---------------------------------------------------------------------------------------------
# Datasheet peaks of known GPUs: the denominator of MFU


@dataclass(frozen=True)
class GpuPeak:
    """Dense (no 2:4 sparsity) tensor-core peaks in TFLOPS, as NVIDIA publishes them: ``bf16`` with FP32
    accumulate (what torch's bf16 matmuls use), ``tf32`` (fp32 matmuls when TF32 is allowed), ``fp32`` without
    tensor cores (torch's default for fp32 matmuls). None: the GPU has no such unit (V100 and T4 have no bf16)."""

    name: str
    pattern: str  # a regular expression on the upper-cased device name, as torch.cuda.get_device_name gives it
    bf16: Optional[float]
    tf32: Optional[float]
    fp32: float
    source: str


_H100_WP = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (H100 SXM5 dense peaks)"
_H100_DS = "NVIDIA H100 datasheet (its sparse tensor figures halved)"
_SAME_AS_H100 = "datasheet (its sparse tensor figures halved), the same GH100 as H100 SXM: the whitepaper's figures"
_H200_NVL = "NVIDIA H200 datasheet, H200 NVL (its sparse tensor figures halved)"
_A100_DS = "NVIDIA A100 datasheet (same peaks for 40/80 GB, SXM and PCIe)"
_ADA_WP = "NVIDIA Ada Lovelace architecture whitepaper, appendix A (FP32 accumulate)"
_GA102_WP = "NVIDIA Ampere GA102 whitepaper, appendix A (FP32 accumulate)"

# Order matters: the first match wins, so variants (NVL, PCIe, S) come before their base names. A laptop part
# shares its desktop name but not its clocks: names with LAPTOP match nothing (see datasheet_gpu).
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak("H100 NVL", r"\bH100\b.*\bNVL\b", 835.5, 417.5, 60.0, _H100_DS),
    GpuPeak("H100 PCIe", r"\bH100\b.*\bPCIE\b", 756.5, 378.0, 51.0, _H100_DS),
    GpuPeak("H100 SXM", r"\bH100\b", 989.4, 494.7, 66.9, _H100_WP),
    GpuPeak("GH200", r"\bGH200\b", 989.4, 494.7, 66.9, f"NVIDIA GH200 {_SAME_AS_H100}"),
    GpuPeak("H200 NVL", r"\bH200\b.*\bNVL\b", 835.5, 417.5, 60.0, _H200_NVL),
    GpuPeak("H200 SXM", r"\bH200\b", 989.4, 494.7, 66.9, f"NVIDIA H200 {_SAME_AS_H100}"),
    GpuPeak("A100 PCIe", r"\bA100\b.*\bPCIE\b", 312.0, 156.0, 19.5, _A100_DS),
    GpuPeak("A100 SXM", r"\bA100\b", 312.0, 156.0, 19.5, _A100_DS),
    GpuPeak("A30", r"\bA30\b", 165.0, 82.0, 10.3, "NVIDIA A30 datasheet"),
    GpuPeak("A10", r"\bA10\b", 125.0, 62.5, 31.2, "NVIDIA A10 datasheet"),
    GpuPeak("L40S", r"\bL40S\b", 362.05, 183.0, 91.6, "NVIDIA L40S datasheet"),
    GpuPeak("L40", r"\bL40\b", 181.05, 90.5, 90.5, "NVIDIA L40 datasheet"),
    GpuPeak("L4", r"\bL4\b", 121.0, 60.0, 30.3, "NVIDIA L4 datasheet (its sparse tensor figures halved)"),
    GpuPeak("RTX A6000", r"\bRTX A6000\b", 154.8, 77.4, 38.7,
            f"NVIDIA RTX A6000 datasheet (tensor 309.7 TFLOPS with sparsity, halved); {_GA102_WP}"),
    GpuPeak("RTX 4090", r"\bRTX 4090\b(?! D\b)", 165.2, 82.6, 82.6, _ADA_WP),
    GpuPeak("RTX 3090", r"\bRTX 3090\b(?! TI\b)", 71.0, 35.6, 35.6, _GA102_WP),
    GpuPeak("V100S PCIe", r"\bV100S\b", None, None, 16.4, "NVIDIA V100 datasheet"),
    GpuPeak("V100 PCIe", r"\bV100\b.*\bPCIE\b", None, None, 14.0, "NVIDIA V100 datasheet"),
    GpuPeak("V100 SXM2", r"\bV100\b.*\bSXM2\b", None, None, 15.7, "NVIDIA V100 datasheet"),
    GpuPeak("T4", r"\bT4\b", None, None, 8.1, "NVIDIA T4 datasheet"),
)


def datasheet_gpu(device_name: str) -> Optional[GpuPeak]:
    """The table's entry for a device name (``torch.cuda.get_device_name``), or None for an unknown GPU or a CPU."""
    name = device_name.upper()
    if "LAPTOP" in name or "MOBILE" in name:
        return None
    return next((g for g in GPU_PEAKS if re.search(g.pattern, name)), None)


def compute_dtype(bf16: bool) -> str:
    """The dtype of a step's matmuls: bf16 under autocast, else tf32 where torch allows it for fp32, else fp32."""
    if bf16:
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def datasheet_peak(device_name: str, dtype: str) -> Optional[dict]:
    """The datasheet's dense peak of ``device_name`` for ``dtype`` (bf16, tf32 or fp32): ``{"gpu", "dtype",
    "tflops", "peak_flops_per_s", "source"}``; None for an unknown GPU, a CPU, or a dtype the GPU has no peak for.
    There is no such number for a CPU: its rate depends on the cores, vector units and clocks actually given."""
    gpu = datasheet_gpu(device_name)
    tflops = getattr(gpu, dtype, None) if gpu is not None else None
    if tflops is None:
        return None
    return {"gpu": gpu.name, "dtype": dtype, "tflops": tflops, "peak_flops_per_s": tflops * 1e12,
            "source": gpu.source}


# Parts of a step, in the order they happen; each is the time from the previous mark to its own.
PARTS = ("data wait", "views to device", "online forward", "target forward", "synthetic negatives",
         "loss (rest of forward)", "backward", "optimizer, EMA, enqueue")


class StepTimeline:
    """Wall time of each part of a training step, from marks taken at the part boundaries.

    Hooks on the model's online and target encoders and a wrapper around its synthetic-negative generator take
    the forward passes' marks; the step itself marks the rest (``train_step(mark=timeline.mark)``), so neither
    the model nor the step changes. Marks are ``time.perf_counter`` on CPU and CUDA events on CUDA, read only
    after the timed window (:func:`timed_window`), so nothing waits for the GPU mid-window.

    A step's time is *defined* as the sum of its parts: the parts tile the step from its start mark to its last,
    so they add up to it by construction, never by the agreement of two clocks.

    ``encoder_hooks=False`` leaves the encoders alone: under ``torch.compile`` a hook that records a timer would
    break their graphs and time another program. Their forwards are then part of "loss (rest of forward)".
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, encoder_hooks: bool = True):
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []  # per step: (part, time or event) closing each part, after a (None, start)
        self._handles = []
        self._negatives = None
        encoders = ((model.online, "online forward"), (model.target, "target forward")) if encoder_hooks else ()
        for enc, part in encoders:
            self._handles.append(enc.register_forward_pre_hook(self._closer("loss (rest of forward)")))
            self._handles.append(enc.register_forward_hook(self._closer(part)))
        if getattr(model, "negatives", None) is not None:
            self._model, self._negatives = model, model.negatives
            model.negatives = _TimedNegatives(model.negatives, self)

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _closer(self, part: str):
        def close(*_):
            self.mark(part)
        return close

    def start(self) -> None:
        """A new step begins now."""
        self.steps.append([(None, self._now())])

    def mark(self, part: str) -> None:
        """The part ``part`` ends now (and the next one starts)."""
        if self.steps:
            self.steps[-1].append((part, self._now()))

    def clear(self) -> None:
        self.steps = []

    def parts_ms(self) -> list[dict]:
        """Milliseconds per part of each step recorded since :meth:`clear` (a part that occurs more than once in
        a step is summed). On CUDA this waits for the last mark's event: call it after the timed window."""
        if self.cuda and self.steps:
            self.steps[-1][-1][1].synchronize()
        out = []
        for marks in self.steps:
            parts = dict.fromkeys(PARTS, 0.0)
            for (_, t0), (part, t1) in zip(marks, marks[1:]):
                parts[part] = parts.get(part, 0.0) + (t0.elapsed_time(t1) if self.cuda else 1000.0 * (t1 - t0))
            out.append(parts)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        if self._negatives is not None:
            self._model.negatives = self._negatives


def timed_window(step: Callable[[], None], steps: int, device: torch.device, timeline: StepTimeline,
                 probe: MemoryProbe) -> dict:
    """Run ``step()`` (which starts and marks ``timeline``) ``steps`` times and time it, waiting for the device
    only before the window (so no warm-up work spills into it) and once after it.

    Returns ``step_ms`` (per step: the sum of its parts), ``parts_ms`` (per step, per part), ``mem_mb`` (per step,
    ``probe``'s peak; on CUDA the allocator's host-side counters, which need no sync) and ``window_s`` (host wall
    time from the first step's start to the device finishing the last, including what runs between steps)."""
    timeline.clear()
    _sync(device)
    mems = []
    t0 = time.perf_counter()
    for _ in range(steps):
        probe.start()
        step()
        mems.append(probe.stop())
    _sync(device)
    window_s = time.perf_counter() - t0
    parts = timeline.parts_ms()
    return {"step_ms": [sum(p.values()) for p in parts], "parts_ms": parts, "mem_mb": mems, "window_s": window_s}


class _TimedNegatives:
    """Stands in for ``model.negatives``: marks the time before and after each call; everything else passes on."""

    def __init__(self, inner, timeline: StepTimeline):
        self._inner, self._timeline = inner, timeline

    def __call__(self, *args, **kwargs):
        self._timeline.mark("loss (rest of forward)")
        out = self._inner(*args, **kwargs)
        self._timeline.mark("synthetic negatives")
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)
