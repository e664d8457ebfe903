"""One method's training step timed, as `synco eval efficiency` (efficiency.py) and `synco doctor --bench` report
it: its inputs, its model and optimizer built as the trainer builds them, and its time, memory, FLOPs and their
rates; in a fresh process when isolated."""

from __future__ import annotations

import gc
import os
from typing import Optional, Protocol

import numpy as np
import torch

from ..device import configure_cpu, use_bf16
from ..errors import SyncoError
from ..methods import method_spec, queue_fit_error
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


class Measurement(Protocol):
    """What a measurement reads of ``synco eval efficiency``'s options (EfficiencyOptions has these fields)."""

    seed: int
    inputs: str
    synthetic: bool
    warmup_steps: int
    steps: int
    flops: bool
    flops_by_part: bool
    peak_size: int
    threads: int


def count_parameters(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"total_params": int(total), "trainable_params": int(trainable),
            "trainable_pct": 100.0 * trainable / max(total, 1), "buffer_mb": buffers / 2**20}


def check_batch(cfg) -> None:
    misfit = queue_fit_error(cfg, cfg.optim.batch_size, "one process: choose batch_size accordingly")
    if misfit:
        raise SyncoError(misfit)


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
    """Batches from the preset's training pipeline (``create_pretrain_data``, as the trainer builds it, with its
    DataLoader workers), epoch after epoch."""

    def __init__(self, cfg, device: torch.device):
        from ..engine.data import create_pretrain_data
        from ..engine.dist import DistInfo

        self.data, self.device, self.epoch = create_pretrain_data(cfg, DistInfo()), device, 0
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

    def __init__(self, cfg, opts: Measurement, device: torch.device):
        from ..engine.optim import create_optimizer
        from ..models.method import create_model
        from ..schedules import scaled_lr

        self.cfg = cfg
        self.model = create_model(cfg).to(device)
        self.params = count_parameters(self.model)
        self.optimizer = create_optimizer(self.model, cfg.optim, scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size),
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


def measure_method(cfg, opts: Measurement, device: torch.device, probe: MemoryProbe) -> dict:
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


def _measure_child(cfg, opts: Measurement, device: str, conn) -> None:
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


def measure_isolated(cfg, opts: Measurement, device: torch.device) -> dict:
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
