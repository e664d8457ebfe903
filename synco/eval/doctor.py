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

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ..device import configure_cpu, cpu_name, resolve_device
from ..errors import SyncoError
from ..io import atomic_write_text, check_output_dir
from . import meters
from .doctor_probes import environment, is_gpu_preset
from .doctor_text import render
from .efficiency import EfficiencyOptions, device_name, load_bench_config
from .efficiency_measure import measure_method, refuse_distributed

# A GPU preset measured on a CPU: a shape that takes well under a minute on two cores (DeiT-S at 224 px).
CPU_FALLBACK_BATCH, CPU_FALLBACK_STEPS, CPU_FALLBACK_WARMUP = 8, 2, 1


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
