"""Meters for one training step: peak memory, FLOPs, the matmul rate the hardware reaches on the spot, and
where the step's wall time goes. ``synco eval efficiency`` reads them around the trainer's own step."""

from __future__ import annotations

import time
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
    ``repeats`` after one warm-up): the rate a step's matrix products could reach at best."""
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
    return {"peak_flops_per_s": 2.0 * size**3 / seconds, "peak_matmul": f"{size}^3 {name}",
            "peak_threads": torch.get_num_threads() if device.type == "cpu" else None}


# Parts of a step, in the order they happen; each is the time from the previous mark to its own.
PARTS = ("data wait", "views to device", "online forward", "target forward", "synthetic negatives",
         "loss (rest of forward)", "backward", "optimizer, EMA, enqueue")


class StepTimeline:
    """Wall time of each part of a training step, from marks taken at the part boundaries.

    Hooks on the model's online and target encoders and a wrapper around its synthetic-negative generator take
    the forward passes' marks; the step itself marks the rest (``train_step(mark=timeline.mark)``), so neither
    the model nor the step changes. Marks are ``time.perf_counter`` on
    CPU and CUDA events on CUDA (read once the step has finished), so nothing waits for the GPU mid-step.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []  # (part, time or event) closing each part
        self._handles = []
        self._negatives = None
        for enc, part in ((model.online, "online forward"), (model.target, "target forward")):
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
        self.marks = [(None, self._now())]

    def mark(self, part: str) -> None:
        """The part ``part`` ends now (and the next one starts)."""
        self.marks.append((part, self._now()))

    def parts_ms(self) -> dict:
        """Milliseconds per part of the last step (parts that occur more than once are summed)."""
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = dict.fromkeys(PARTS, 0.0)
        for (_, t0), (part, t1) in zip(self.marks, self.marks[1:]):
            out[part] = out.get(part, 0.0) + (t0.elapsed_time(t1) if self.cuda else 1000.0 * (t1 - t0))
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        if self._negatives is not None:
            self._model.negatives = self._negatives


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
