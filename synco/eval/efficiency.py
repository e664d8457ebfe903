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

import gc
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import METHODS, load_config, method_spec
from ..device import configure_cpu, cpu_name, use_bf16
from ..errors import SyncoError
from ..options import MAX_THREADS, SEED_RANGE, check_options, opt
from .meters import (
    PARTS,
    MemoryProbe,
    StepTimeline,
    compute_dtype,
    count_flops,
    datasheet_peak,
    flops_by_part,
    matmul_peak,
    rss_mb,
    timed_window,
)
from .results import markdown_table, save_result

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
    return load_bench_config(opts.preset, ovr)


def load_bench_config(preset: str, overrides: list[str]):
    """The preset's config with ``overrides``; a preset that needs ``data.root`` gets a placeholder, because
    steps on random inputs read no data."""
    try:
        return load_config(preset, overrides)
    except SyncoError as e:
        if "data.root" not in str(e):
            raise
        return load_config(preset, list(overrides) + ["data.root=unused"])


def _epoch_images(opts: EfficiencyOptions, cfg) -> tuple[int, str]:
    if opts.epoch_images is not None:
        return int(opts.epoch_images), "epoch_images"
    if cfg.data.dataset == "digits":
        from sklearn.datasets import load_digits

        from ..data.digits import split_indices

        return len(split_indices(load_digits().target, "train")), "digits train split"
    return IMAGENET_TRAIN_IMAGES, "ImageNet-1k train"


def check_batch(cfg) -> None:
    if method_spec(cfg).uses_queue and cfg.contrast.queue_size % cfg.optim.batch_size:
        raise SyncoError(f"contrast.queue_size={cfg.contrast.queue_size} must be a multiple of the batch size "
                         f"{cfg.optim.batch_size}; choose batch_size accordingly or set contrast.queue_size.")


class _RandomInputs:
    """The same random batch on the device every step: no data loading in the step."""

    def __init__(self, cfg, device: torch.device, seed: int):
        batch, size = cfg.optim.batch_size, cfg.data.image_size
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.x1 = torch.randn(batch, 3, size, size, generator=gen).to(device)
        self.x2 = torch.randn(batch, 3, size, size, generator=gen).to(device)

    def next(self, timeline: StepTimeline):
        timeline.mark("data wait")
        timeline.mark("views to device")
        return self.x1, self.x2

    def close(self) -> None:
        self.x1 = self.x2 = None


class _DeviceViewInputs:
    """``data.augment.on=device`` without the workers: the same random uint8 crops ``[B, 2, 3, S, S]`` on the device
    every step, made into both views there with the step's own seeds (flip, jitter, grayscale, blur, solarise)."""

    def __init__(self, cfg, device: torch.device, seed: int):
        from ..data.batch_augment import BatchViews
        from ..data.transforms import view_params

        batch, size = cfg.optim.batch_size, cfg.data.image_size
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.crops = torch.randint(0, 256, (batch, 2, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
        self.views = BatchViews(size, view_params(cfg.data.augment)).to(device)
        self.seed, self.step = seed, 0

    def next(self, timeline: StepTimeline):
        from ..data.batch_augment import sample_seeds

        timeline.mark("data wait")
        self.step += 1
        x1, x2 = self.views(self.crops, sample_seeds(self.seed, self.step, torch.arange(self.crops.shape[0])))
        timeline.mark("views to device")
        return x1, x2

    def close(self) -> None:
        self.crops = self.views = None


class _LoaderInputs:
    """Batches from the preset's training pipeline (``build_pretrain_data``, as the trainer builds it, with its
    DataLoader workers), epoch after epoch."""

    def __init__(self, cfg, device: torch.device):
        from ..engine.data import build_pretrain_data
        from ..engine.dist import DistInfo

        self.data, self.device, self.epoch = build_pretrain_data(cfg, DistInfo()), device, 0
        self._it = iter(self.data.loader(0))

    def next(self, timeline: StepTimeline):
        try:
            batch, _ = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.data.loader(self.epoch))
            batch, _ = next(self._it)
        timeline.mark("data wait")
        x1, x2 = self.data.views(batch, self.epoch, self.device)  # on=device: made here, on the device
        timeline.mark("views to device")
        return x1, x2

    def close(self) -> None:
        self._it = self.data = None  # shuts the workers down


def refuse_distributed(what: str = "synco eval efficiency") -> None:
    """Stop under torchrun with several processes: the measurement is of one process (no DDP all-reduce, no
    SyncBatchNorm), and N processes each timing their own copy would report a speed no DDP run has."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world > 1:
        raise SyncoError(f"{what} measures one process and does not time DDP: under torchrun (WORLD_SIZE={world}) "
                         "every process would time its own step without the gradient all-reduce and synchronised "
                         "BatchNorm of a multi-GPU run. Run it as one process (without torchrun); a real "
                         "multi-GPU run reports its images_per_second in summary.json.")


class _Bench:
    """One method's model, optimizer and inputs, built as the trainer builds them, and its timed step: the
    trainer's own ``train_step`` at a fixed momentum."""

    def __init__(self, cfg, opts: EfficiencyOptions, device: torch.device):
        from ..engine.optim import build_optimizer
        from ..models.method import create_model
        from ..schedules import scaled_lr

        self.cfg = cfg
        self.model = create_model(cfg).to(device)
        self.params = count_parameters(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim, scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size),
                                         device)
        self.online = self.model.online  # compiled by compile(), after the FLOPs are counted
        inputs = {"loader": lambda: _LoaderInputs(cfg, device),
                  "views": lambda: _DeviceViewInputs(cfg, device, opts.seed),
                  "random": lambda: _RandomInputs(cfg, device, opts.seed)}
        self.inputs = inputs[opts.inputs]()
        self.bf16 = use_bf16(cfg.precision, device)
        self.use_syn = bool(opts.synthetic and method_spec(cfg).uses_synthetic)
        self.timeline = StepTimeline(self.model, device, encoder_hooks=not cfg.compile)
        self.model.train()

    def compile(self) -> None:
        """What engine/train.py compiles with compile=true: the online encoder the gradients go through, and the
        target and the loss where the model offers that. Called after the FLOPs are counted: a compiled graph
        hides its operations from the counter."""
        self.online = torch.compile(self.model.online)
        compile_rest = getattr(self.model, "compile_target_and_loss", None)
        if compile_rest is not None:
            compile_rest()

    def _compute(self, online, x1: torch.Tensor, x2: torch.Tensor) -> None:
        from ..engine.step import train_step

        cfg = self.cfg
        train_step(self.model, online, self.optimizer, [(x1, x2)], use_synthetic=self.use_syn,
                   momentum=cfg.contrast.momentum_start, clip_grad=cfg.optim.clip_grad, bf16=self.bf16,
                   mark=self.timeline.mark)

    def step(self) -> None:
        self.timeline.start()
        x1, x2 = self.inputs.next(self.timeline)
        self._compute(self.online, x1, x2)

    def count(self, by_part: bool = True) -> tuple[int, Optional[dict]]:
        """FLOPs of one step of the model (not of the data pipeline), in total and (``by_part``) by part, counted
        eagerly (FLOPs depend on shapes only). The counted step trains like any other, so it comes before the
        warm-up, never between measured steps."""
        self.timeline.start()
        x1, x2 = self.inputs.next(self.timeline)
        total, _ = count_flops(lambda: self._compute(self.online, x1, x2))
        return total, flops_by_part(self.model, x1, x2, total, self.bf16) if by_part else None

    def close(self) -> None:
        self.timeline.remove()
        self.inputs.close()
        self.model = self.online = self.optimizer = self.inputs = self.timeline = None


def measure_method(cfg, opts: EfficiencyOptions, device: torch.device, probe: MemoryProbe) -> dict:
    """Time, memory, FLOPs and breakdown of ``opts.steps`` training steps of ``cfg.method`` (after one step
    whose FLOPs are counted and ``opts.warmup_steps``; at least 2 with ``compile=true``, whose first calls
    compile). The measured steps run back to back: the device is waited for before and after the window only."""
    refuse_distributed()
    torch.manual_seed(opts.seed)
    check_batch(cfg)
    gc.collect()
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb()
    warmup = max(opts.warmup_steps, 2 if cfg.compile else 0)
    bench = _Bench(cfg, opts, device)
    bf16, params, use_syn = bench.bf16, bench.params, bench.use_syn
    try:
        counted = bench.count(opts.flops_by_part) if opts.flops else None
        if cfg.compile:
            bench.compile()
        for _ in range(warmup):
            bench.step()
        window = timed_window(bench.step, opts.steps, device, bench.timeline, probe)
    finally:
        bench.close()
        bench = None  # free the model before the next method is measured
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row = {**params, **_timing_row(cfg, window, before), "synthetic": use_syn, "inputs": opts.inputs,
           "compile": bool(cfg.compile), "precision": "bf16" if bf16 else "fp32", "warmup_steps": warmup,
           "steps": opts.steps}
    if cfg.compile:
        row["breakdown_note"] = "compile=true: the encoders' forwards are counted in 'loss (rest of forward)'"
    if counted is not None:
        row.update(flop_rates(counted[0], counted[1], row, device, bf16, opts.peak_size))
    return row


def _timing_row(cfg, window: dict, before_mb: float) -> dict:
    """Step time, throughput and memory from a :func:`~synco.eval.meters.timed_window`. The mean step is the
    total over the window divided by the steps (what an epoch takes); the median is robust to one slow step."""
    batch = cfg.optim.batch_size
    times = np.asarray(window["step_ms"]) / 1000.0
    step_s = float(np.mean(times))
    breakdown = {part: float(np.mean([p[part] for p in window["parts_ms"]])) for part in PARTS}
    mems = window["mem_mb"]
    return {"batch_size": batch, "image_size": cfg.data.image_size,
            "step_ms": 1000.0 * step_s, "step_ms_median": 1000.0 * float(np.median(times)),
            "step_ms_std": 1000.0 * float(np.std(times)), "window_s": window["window_s"],
            "images_per_s": batch / step_s, "avg_mem_mb": float(np.mean(mems)), "peak_mem_mb": float(np.max(mems)),
            "before_model_mb": before_mb, "peak_over_before_mb": float(np.max(mems)) - before_mb,
            "breakdown_ms": breakdown,
            # the parts tile each step, so the mean parts sum to the mean step and the shares to 1
            "breakdown_share": {part: ms / (1000.0 * step_s) for part, ms in breakdown.items()}}


def flop_rates(flops: int, part_flops: Optional[dict], row: dict, device: torch.device, bf16: bool,
               peak_size: int = 0) -> dict:
    """FLOPs of a step and the rate achieved: MFU against the datasheet's dense peak of the GPU in the step's
    compute dtype (None on a CPU or an unknown GPU), and, as a secondary yardstick, the fraction of a matmul
    timed here and now (``matmul_utilization``). "model": over the step less waiting for and moving data."""
    step_s = row["step_ms"] / 1000.0
    model_s = max(step_s - (row["breakdown_ms"]["data wait"] + row["breakdown_ms"]["views to device"]) / 1000.0,
                  1e-12)
    dtype = compute_dtype(bf16)
    sheet = datasheet_peak(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None
    matmul = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32, peak_size)
    achieved = flops / step_s
    return {"flops_per_step": flops, "flops_per_image": flops / row["batch_size"], "flops_by_part": part_flops,
            "achieved_flops_per_s": achieved, "compute_dtype": dtype, "datasheet": sheet,
            "mfu": achieved / sheet["peak_flops_per_s"] if sheet else None,
            "mfu_model": flops / model_s / sheet["peak_flops_per_s"] if sheet else None,
            **matmul, "matmul_utilization": achieved / matmul["matmul_flops_per_s"],
            "matmul_utilization_model": flops / model_s / matmul["matmul_flops_per_s"]}


def _measure_child(cfg, opts: EfficiencyOptions, device: str, conn) -> None:
    """Entry point of an isolated measurement (a spawned process): one method, result sent through ``conn``."""
    try:
        configure_cpu(opts.threads)
        dev = torch.device(device)
        conn.send(("ok", measure_method(cfg, opts, dev, MemoryProbe(dev))))
    except SyncoError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - reported by the parent as one paragraph, not a child's traceback
        conn.send(("error", f"the {cfg.method} measurement failed: {type(e).__name__}: {e}"))
    finally:
        conn.close()


def measure_isolated(cfg, opts: EfficiencyOptions, device: torch.device) -> dict:
    """:func:`measure_method` in a fresh process, so every method starts from the same process memory."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    # Not a daemon: with inputs=loader the child starts DataLoader workers, which daemons may not have. The parent
    # still never leaves it behind (terminated below on any way out).
    proc = ctx.Process(target=_measure_child, args=(cfg, opts, str(device), send), daemon=False)
    proc.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        proc.join()
        raise SyncoError(f"the {cfg.method} measurement process died (exit code {proc.exitcode}); "
                         "out of memory? Try a smaller batch_size.") from None
    except BaseException:  # a signal or Ctrl-C while waiting: take the child down too
        proc.terminate()
        proc.join()
        raise
    finally:
        recv.close()
    proc.join()
    if status != "ok":
        raise SyncoError(payload)
    return payload


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
    text = head + "\n" + markdown_table(rows, cols)
    return text + "\n\n" + cost_table(result)


def _percent(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def cost_table(result: dict) -> str:
    """FLOPs and MFU of one step, and the share of the step each part takes."""
    methods = result["methods"]
    first = next(iter(methods.values()))
    parts = [p for p in PARTS if any(r["breakdown_ms"].get(p, 0.0) > 0 for r in methods.values())] or list(PARTS)
    cols = ["Method", "Step (ms)"]
    if "flops_per_step" in first:
        cols += ["GFLOP/step", "GFLOP/s", "MFU", "MFU (model only)", "of matmul here"]
    cols += [f"{p} (%)" for p in parts]
    rows = []
    for method, r in methods.items():
        row = {"Method": method, "Step (ms)": r["step_ms"]}
        if "flops_per_step" in r:
            r = _current_keys(r)
            row.update({"GFLOP/step": r["flops_per_step"] / 1e9, "GFLOP/s": r["achieved_flops_per_s"] / 1e9,
                        "MFU": _percent(r.get("mfu")), "MFU (model only)": _percent(r.get("mfu_model")),
                        "of matmul here": _percent(r.get("matmul_utilization"))})
        row.update({f"{p} (%)": 100.0 * r["breakdown_share"][p] for p in parts})
        rows.append(row)
    head = (f"Cost against the limit (FLOPs: torch.utils.flop_counter, forward + backward; {cost_yardsticks(first)}; "
            f"inputs: {first.get('inputs', 'random')}; parts as % of the step, which they add up to)")
    return head + "\n" + markdown_table(rows, cols)


def _current_keys(row: dict) -> dict:
    """A row of an efficiency.json written before MFU was stated against the datasheet: its "mfu" was the fraction
    of the matmul timed on the spot, so it is shown as that, and its MFU as unknown."""
    if "datasheet" in row or "peak_flops_per_s" not in row:
        return row
    return {**row, "datasheet": None, "mfu": None, "mfu_model": None, "matmul_utilization": row.get("mfu"),
            "matmul_flops_per_s": row["peak_flops_per_s"], "matmul_shape": row.get("peak_matmul"),
            "matmul_threads": row.get("peak_threads")}


def cost_yardsticks(row: dict) -> str:
    """What MFU and the secondary matmul fraction of a row are measured against, in words."""
    if "flops_per_step" not in row:
        return "FLOPs not counted"
    row = _current_keys(row)
    sheet = row.get("datasheet")
    mfu = (f"MFU against the {sheet['gpu']} datasheet's dense {sheet['dtype']} peak, {sheet['tflops']:g} TFLOPS"
           if sheet else "MFU n/a: no datasheet peak for this device (a CPU, or a GPU not in meters.GPU_PEAKS)")
    if "matmul_flops_per_s" not in row:
        return mfu
    threads = row.get("matmul_threads")
    return (f"{mfu}; 'of matmul here': against a {row['matmul_shape']} matmul timed on the spot, "
            f"{row['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s"
            f"{'' if threads is None else f', {threads} thread' + ('' if threads == 1 else 's')}")
