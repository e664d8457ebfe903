"""`synco eval efficiency`: parameters, memory and training time of SynCo / MoBY / BYOL (Table 15).

Each method is built from the same preset (only ``method`` changes, so the backbone and heads are the same)
and timed on full training steps of random images of the preset's size: forward of both views, loss (with
synthetic hard negatives for synco), backward, gradient clipping, AdamW step, EMA update and enqueue, exactly
as the trainer does them. Data loading is left out by default (``inputs=random``), so the numbers compare the
methods, not the input pipeline; ``inputs=loader`` times the trainer's data pipeline as well.

* parameters: total = online + target encoder (the paper's "Total Params"), trainable = those with gradients;
* memory: on CUDA the peak of ``torch.cuda.memory_allocated`` within each step (CUDA caching allocator), its
  average over the measured steps ("Avg Mem") and maximum; on CPU the process's peak resident set size within
  each step (``/proc/self/status`` VmHWM, reset before each step through ``/proc/self/clear_refs``; where that
  is not possible, VmRSS after each step), so CPU numbers include the Python/PyTorch runtime; "Peak - Before"
  subtracts what was in use just before the method's model was built (model, optimizer state, activations).
  On CPU each method runs in a fresh (spawned) process by default (``isolate``), so no method inherits
  another's allocator state;
* time: the measured steps run back to back, as in training: the device is waited for once before the window
  and once after it, never between steps. Each step is timed from marks at its part boundaries (CUDA events on
  CUDA, read after the window; ``time.perf_counter`` on CPU), and its time is the sum of its parts. Time per
  epoch = steps per epoch (``epoch_images // batch_size``) x mean step time, projected to 100 and 300 epochs,
  for one process. ``compile=true`` in the preset compiles what the trainer compiles (at least 2 warm-up
  steps then). DDP is not measured: under torchrun with several processes this refuses to run;
* cost against the limit: the FLOPs of one step (forward and backward; ``torch.utils.flop_counter``, which
  counts matrix products, convolutions and attention), the FLOP/s achieved over the mean step time, and MFU:
  that rate over the GPU's dense datasheet peak in the step's compute dtype (``meters.GPU_PEAKS``; none on a
  CPU or an unknown GPU). Secondary, and labelled so: the fraction of a square matmul (``peak_size``) timed on
  the spot in the same dtype and threads (``matmul_utilization``), the only yardstick on a CPU;
* where a step goes: the time of each part (waiting for data, moving it to the device and augmenting there,
  online forward, target forward, synthetic negatives, the rest of the loss, backward, optimizer + EMA +
  enqueue); the parts add up to the step by construction. With ``inputs=random`` the step takes the same random
  batch every time, so waiting for data is zero; with ``inputs=loader`` batches come from the preset's training
  pipeline (its DataLoader workers and augmentation).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import load_config
from ..device import configure_cpu, cpu_name
from ..methods import METHODS
from ..options import MAX_THREADS, SEED_RANGE, check_options, opt
from .efficiency_measure import check_batch, measure_isolated, measure_method, refuse_distributed
from .efficiency_tables import efficiency_table
from .meters import MemoryProbe, rss_mb
from .results import save_result

IMAGENET_TRAIN_IMAGES = 1_281_167
MAX_PEAK_SIZE = 16384  # the timed matmul's side: three fp32 matrices of this size are 3 GiB


@dataclass
class EfficiencyOptions:
    preset: str = "cpu-demo"  # a shipped preset name or a YAML path; only `method` changes between rows
    methods: list[str] = opt(factory=lambda: ["byol", "moby", "synco"], nonempty=True, choices=METHODS)
    # per process; default: the preset's optim.batch_size
    batch_size: Optional[int] = opt(None, ge=2, why="the heads' BatchNorm needs two images; or null for the preset's")
    steps: int = opt(10, ge=1)  # measured training steps per method
    warmup_steps: int = opt(3, ge=0)  # unmeasured steps first (allocator, kernels, queues)
    # default: digits train size for digits, else ImageNet-1k (1,281,167)
    epoch_images: Optional[int] = opt(None, ge=1, why="or null for the dataset's")
    epochs: list[int] = opt(factory=lambda: [100, 300], nonempty=True, ge=1)
    synthetic: bool = True  # synco steps use synthetic hard negatives (the costly part)
    device: str = "auto"
    # auto: bf16 autocast on CUDA, fp32 on CPU (as the trainer)
    precision: str = opt("auto", choices=("auto", "bf16", "fp32"))
    threads: int = opt(0, ge=0, le=MAX_THREADS, why=f"0 = torch's default; at most {MAX_THREADS}")
    isolate: Optional[bool] = None  # each method in a fresh process (default: on CPU, where RSS is per process)
    seed: int = opt(0, **SEED_RANGE)
    # random: one random batch on the device (compares the methods); views: random uint8 crops made into views on the
    # device each step (the device side of data.augment.on=device); loader: the preset's data pipeline
    inputs: str = opt("random", choices=("random", "views", "loader"))
    flops: bool = True  # count one step's FLOPs; report MFU (datasheet peak) and the fraction of a matmul timed here
    flops_by_part: bool = True  # split the FLOPs into online / target / loss (two more passes of the encoders)
    # side of the square matmul timed on the spot; 0: 1024 on CPU, 8192 on CUDA
    peak_size: int = opt(0, ge=0, le=MAX_PEAK_SIZE, why="0 = the device's default; three such fp32 matrices of "
                                                        f"{MAX_PEAK_SIZE} are 3 GiB")


# ---------------------------------------------------------------------------------------------
# The command: a config per method, each method's step measured, the epoch times projected


def _config(opts: EfficiencyOptions, method: str, overrides: list[str]):
    ovr = list(overrides) + [f"method={method}", f"device={opts.device}", f"precision={opts.precision}"]
    if opts.batch_size is not None:
        ovr.append(f"optim.batch_size={int(opts.batch_size)}")
    return load_bench_config(opts.preset, ovr)


def load_bench_config(preset: str, overrides: list[str]):
    """The preset's config with ``overrides``, no ``data.root`` needed: steps on random inputs read no data (with
    ``inputs=loader`` the data pipeline asks for it)."""
    return load_config(preset, overrides, needs_data=False)


def _epoch_images(opts: EfficiencyOptions, cfg) -> tuple[int, str]:
    if opts.epoch_images is not None:
        return int(opts.epoch_images), "epoch_images"
    if cfg.data.dataset == "digits":
        from sklearn.datasets import load_digits

        from ..data.digits import split_indices

        return len(split_indices(load_digits().target, "train")), "digits train split"
    return IMAGENET_TRAIN_IMAGES, "ImageNet-1k train"


def run_efficiency(out: Optional[Path], opts: EfficiencyOptions, overrides: Optional[list[str]] = None,
                   log: Callable[[str], None] = print) -> dict:
    refuse_distributed()
    check_options(opts)  # also when called as a library, without the command line
    methods = [str(m) for m in opts.methods]
    from .common import resolve_device

    device = resolve_device(opts.device)
    configure_cpu(opts.threads)
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
              "device": device_name(device), "threads": torch.get_num_threads(), "memory": probe.kind,
              "process_baseline_mb": baseline if device.type == "cpu" else None, "isolated": isolate,
              "epoch_images": epoch_images, "epoch_images_source": source, "methods": rows,
              "options": asdict(opts)}
    if out is not None:
        save_result(out, "efficiency", result)
    log(efficiency_table(result))
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name() or 'unknown'}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


