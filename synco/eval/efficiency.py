"""`synco eval efficiency`: parameters, memory and training time of SynCo / MoBY / BYOL (Table 15).

Each method is built from the same preset (only ``method`` changes, so the backbone and heads are the same)
and timed on full training steps of random images of the preset's size: forward of both views, loss (with
synthetic hard negatives for synco), backward, gradient clipping, AdamW step, EMA update and enqueue, exactly
as the trainer does them. Data loading is left out, so the numbers compare the methods, not the input pipeline.

* parameters: total = online + target encoder (the paper's "Total Params"), trainable = those with gradients;
* memory: on CUDA the peak of ``torch.cuda.memory_allocated`` within each step (CUDA caching allocator), its
  average over the measured steps ("Avg Mem") and maximum; on CPU the process's peak resident set size within
  each step (``/proc/self/status`` VmHWM, reset before each step through ``/proc/self/clear_refs``; where that
  is not possible, VmRSS after each step), so CPU numbers include the Python/PyTorch runtime; "Peak - Before"
  subtracts what was in use just before the method's model was built (model, optimizer state, activations).
  On CPU each method runs in a fresh (spawned) process by default (``isolate``), so no method inherits
  another's allocator state;
* time: CUDA events around each step on CUDA, ``time.perf_counter`` on CPU; time per epoch = steps per epoch
  (``epoch_images // batch_size``) x mean step time, projected to 100 and 300 epochs, for one process.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import METHODS, load_config
from ..errors import SyncoError
from .results import markdown_table, save_result

IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass
class EfficiencyOptions:
    preset: str = "cpu-demo"  # a shipped preset name or a YAML path; only `method` changes between rows
    methods: list = field(default_factory=lambda: ["byol", "moby", "synco"])
    batch_size: Optional[int] = None  # per process; default: the preset's optim.batch_size
    steps: int = 10  # measured training steps per method
    warmup_steps: int = 3  # unmeasured steps first (allocator, kernels, queues)
    epoch_images: Optional[int] = None  # default: digits train size for digits, else ImageNet-1k (1,281,167)
    epochs: list = field(default_factory=lambda: [100, 300])
    synthetic: bool = True  # synco steps use synthetic hard negatives (the costly part)
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU (as the trainer)
    threads: int = 0  # torch CPU threads (0 = torch default)
    isolate: Optional[bool] = None  # each method in a fresh process (default: on CPU, where RSS is per process)
    seed: int = 0


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


def count_parameters(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"total_params": int(total), "trainable_params": int(trainable),
            "trainable_pct": 100.0 * trainable / max(total, 1), "buffer_mb": buffers / 2**20}


def _config(opts: EfficiencyOptions, method: str, overrides: list[str]):
    ovr = list(overrides) + [f"method={method}", f"device={opts.device}", f"precision={opts.precision}"]
    if opts.batch_size is not None:
        ovr.append(f"optim.batch_size={int(opts.batch_size)}")
    try:
        return load_config(opts.preset, ovr)
    except SyncoError as e:
        if "data.root" not in str(e):
            raise
        return load_config(opts.preset, ovr + ["data.root=unused"])  # no data is read


def _epoch_images(opts: EfficiencyOptions, cfg) -> tuple[int, str]:
    if opts.epoch_images is not None:
        if opts.epoch_images < 1:
            raise SyncoError(f"epoch_images must be >= 1, got {opts.epoch_images}.")
        return int(opts.epoch_images), "epoch_images"
    if cfg.data.dataset == "digits":
        from sklearn.datasets import load_digits

        from ..data.digits import _split_indices

        return len(_split_indices(load_digits().target, "train")), "digits train split"
    return IMAGENET_TRAIN_IMAGES, "ImageNet-1k train"


def check_batch(cfg) -> None:
    if cfg.method != "byol" and cfg.contrast.queue_size % cfg.optim.batch_size:
        raise SyncoError(f"contrast.queue_size={cfg.contrast.queue_size} must be a multiple of the batch size "
                         f"{cfg.optim.batch_size}; choose batch_size accordingly or set contrast.queue_size.")


def measure_method(cfg, opts: EfficiencyOptions, device: torch.device, probe: MemoryProbe) -> dict:
    """Time and memory of ``opts.steps`` training steps of ``cfg.method`` (after ``opts.warmup_steps``)."""
    from ..engine.optim import build_optimizer
    from ..models.method import SelfSupervisedModel
    from ..schedules import scaled_lr

    torch.manual_seed(opts.seed)
    batch = cfg.optim.batch_size
    check_batch(cfg)
    gc.collect()
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb()
    model = SelfSupervisedModel(cfg).to(device)
    params = count_parameters(model)
    optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim.base_lr, batch), device)
    size = cfg.data.image_size
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    x1 = torch.randn(batch, 3, size, size, generator=gen).to(device)
    x2 = torch.randn(batch, 3, size, size, generator=gen).to(device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    use_syn = bool(opts.synthetic and cfg.method == "synco")
    cuda = device.type == "cuda"
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, (k1, k2) = model(x1, x2, use_synthetic=use_syn)
        loss.backward()
        model.enqueue(k1, k2)
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.online.parameters(), cfg.optim.clip_grad, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.momentum_update(cfg.contrast.momentum_start)

    for _ in range(max(opts.warmup_steps, 0)):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    times, mems = [], []
    for _ in range(opts.steps):
        probe.start()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        mems.append(probe.stop())
    model = optimizer = x1 = x2 = None  # free them before the next method is measured
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    step_s = float(np.mean(times))
    return {**params, "batch_size": batch, "image_size": size, "synthetic": use_syn,
            "step_ms": 1000.0 * step_s, "step_ms_std": 1000.0 * float(np.std(times)),
            "images_per_s": batch / step_s, "avg_mem_mb": float(np.mean(mems)), "peak_mem_mb": float(np.max(mems)),
            "before_model_mb": before, "peak_over_before_mb": float(np.max(mems)) - before}


def _measure_child(cfg, opts: EfficiencyOptions, device: str, conn) -> None:
    """Entry point of an isolated measurement (a spawned process): one method, result sent through ``conn``."""
    try:
        if opts.threads > 0:
            torch.set_num_threads(opts.threads)
        dev = torch.device(device)
        conn.send(("ok", measure_method(cfg, opts, dev, MemoryProbe(dev))))
    except SyncoError as e:
        conn.send(("error", str(e)))
    finally:
        conn.close()


def measure_isolated(cfg, opts: EfficiencyOptions, device: torch.device) -> dict:
    """:func:`measure_method` in a fresh process, so every method starts from the same process memory."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure_child, args=(cfg, opts, str(device), send), daemon=True)
    proc.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        proc.join()
        raise SyncoError(f"the {cfg.method} measurement process died (exit code {proc.exitcode}); "
                         "out of memory? Try a smaller batch_size.") from None
    finally:
        recv.close()
    proc.join()
    if status != "ok":
        raise SyncoError(payload)
    return payload


def run_efficiency(out: Optional[Path], opts: EfficiencyOptions, overrides: Optional[list[str]] = None,
                   log: Callable[[str], None] = print) -> dict:
    methods = [str(m) for m in opts.methods]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SyncoError(f"methods must be a non-empty list of {', '.join(METHODS)}, got {opts.methods}.")
    if opts.steps < 1:
        raise SyncoError(f"steps must be >= 1, got {opts.steps}.")
    from .common import resolve_device

    device = resolve_device(opts.device)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    probe = MemoryProbe(device)
    isolate = device.type == "cpu" if opts.isolate is None else bool(opts.isolate)
    baseline = rss_mb()
    configs = {method: _config(opts, method, overrides or []) for method in methods}
    for cfg in configs.values():
        check_batch(cfg)
    rows, cfg0 = {}, configs[methods[0]]
    for method, cfg in configs.items():
        log(f"{method}: {opts.warmup_steps} warm-up + {opts.steps} measured steps, batch {cfg.optim.batch_size}, "
            f"{cfg.model.backbone} at {cfg.data.image_size}px on {device.type}")
        rows[method] = measure_isolated(cfg, opts, device) if isolate else measure_method(cfg, opts, device, probe)
    epoch_images, source = _epoch_images(opts, cfg0)
    for r in rows.values():
        steps_per_epoch = max(epoch_images // r["batch_size"], 1)
        r["steps_per_epoch"] = steps_per_epoch
        r["epoch_min"] = steps_per_epoch * r["step_ms"] / 1000.0 / 60.0
        for e in opts.epochs:
            r[f"hours_{int(e)}"] = r["epoch_min"] * int(e) / 60.0
    result = {"protocol": "efficiency", "preset": opts.preset, "overrides": list(overrides or []),
              "backbone": cfg0.model.backbone, "backbone_kwargs": cfg0.model.backbone_kwargs,
              "device": _device_name(device), "threads": torch.get_num_threads(), "memory": probe.kind,
              "process_baseline_mb": baseline if device.type == "cpu" else None, "isolated": isolate,
              "epoch_images": epoch_images, "epoch_images_source": source, "methods": rows,
              "options": asdict(opts)}
    if out is not None:
        save_result(out, "efficiency", result)
    log(efficiency_table(result))
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return f"cpu ({name or 'unknown'}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def efficiency_table(result: dict) -> str:
    epochs = [int(e) for e in result["options"]["epochs"]]
    cols = ["Method", "Total Params", "Trainable Params", "Avg Mem (MB)", "Peak Mem (MB)", "Peak - Before (MB)",
            "Step (ms)", "Images/s",
            "Time/Epoch (min)", *[f"{e} Ep. (h)" for e in epochs]]
    rows = []
    for method, r in result["methods"].items():
        rows.append({"Method": method, "Total Params": _millions(r["total_params"]),
                     "Trainable Params": f"{_millions(r['trainable_params'])} ({r['trainable_pct']:.2f}%)",
                     "Avg Mem (MB)": r["avg_mem_mb"], "Peak Mem (MB)": r["peak_mem_mb"],
                     "Peak - Before (MB)": r["peak_over_before_mb"], "Step (ms)": r["step_ms"],
                     "Images/s": r["images_per_s"], "Time/Epoch (min)": r["epoch_min"],
                     **{f"{e} Ep. (h)": r[f"hours_{e}"] for e in epochs}})
    head = (f"{result['backbone']} on {result['device']}; memory: {result['memory']} (Peak - Before: above the "
            f"memory in use before the method's model was built); "
            f"{'each method in a fresh process; ' if result.get('isolated') else ''}"
            f"epoch = {result['epoch_images']} images ({result['epoch_images_source']})")
    return head + "\n" + markdown_table(rows, cols)
