"""The pretraining loop: one process or many (torchrun), CPU or CUDA, resumable at any checkpoint.

Every schedule (learning rate, EMA momentum, synthetic-negative window) is a function of the global
optimizer step or the epoch derived from it, so a resumed run continues them exactly; epochs count
passes over the whole dataset, whatever the number of processes.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .. import schedules
from ..config import Config, save_config, with_defaults
from ..device import configure_cpu, resolve_device, use_bf16
from ..errors import SyncoError
from ..methods import queue_fit_error, synthetic_window
from ..models.backbone import backbone_meta, export_safetensors, load_state_checked
from ..models.method import create_model
from ..resume import RESUMABLE_CHANGES, config_differences
from . import checkpoint as ckpt, dist as D, signals as sig
from .data import create_pretrain_data
from .metrics import MetricsLogger
from .optim import create_optimizer, create_scheduler
from .step import train_step
from .syncbn import convert_sync_batchnorm


class NonFiniteLoss(SyncoError):
    pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(cfg: Config, rank: int, epoch: int) -> int:
    """Each (rank, epoch) draws from its own stream, so runs split by a resume replay the same numbers. Modulo 2^63,
    an odd multiple of the seed is a bijection: every seed of [0, 2^63) has streams of its own (modulo 2^31, seeds
    2^31 apart shared them), and seeds below 2,147 keep the streams they had with 2^31."""
    return (cfg.seed * 1_000_003 + rank * 10_007 + epoch * 101) % 2**63


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress (complete epochs before it)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed


# Called on every process after each epoch's checkpoint as ``hook(trainer, epoch)``; a returned dict is logged
# (e.g. the k-NN monitor, which lives above the engine and so reaches it only through this hook).
EpochHook = Callable[["Trainer", int], Optional[dict]]

# Called on every process after each optimizer step as ``hook(trainer)``. Returning True ends ``train()`` after this
# step's checkpoint (on an epoch's last step, after the epoch's checkpoint and hooks), so ``resume=true`` continues
# exactly there: a job's time budget, a preemption notice, or a test's simulated kill. The answer must be the same
# on every process (decide from ``trainer.state.step``, or agree through torch.distributed).
StepHook = Callable[["Trainer"], bool]


def stop_at_step(step: int) -> StepHook:
    """A step hook that ends training after optimizer step ``step`` (the run stays resumable)."""
    return lambda trainer: trainer.state.step == step


class Trainer:
    def __init__(self, cfg: Config, out_dir: Path, progress: bool = True, epoch_hooks: tuple[EpochHook, ...] = (),
                 step_hooks: tuple[StepHook, ...] = ()):
        self.cfg, self.out = cfg, Path(out_dir)
        self.epoch_hooks, self.step_hooks = epoch_hooks, step_hooks
        self.device = resolve_device(cfg.device)
        self.dist = D.init_distributed(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        configure_cpu(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.progress = progress and self.dist.is_main
        self.bf16 = use_bf16(cfg.precision, self.device)
        seed_all(cfg.seed + self.dist.rank)

        self.world = self.dist.world_size
        self.global_batch = cfg.optim.batch_size * self.world
        self.effective_batch = self.global_batch * cfg.optim.accum_steps
        misfit = queue_fit_error(cfg, self.global_batch, f"optim.batch_size={cfg.optim.batch_size} x {self.world} "
                                                         "processes")
        if misfit:
            raise SyncoError(misfit)

        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        D.barrier()
        self.data = create_pretrain_data(cfg, self.dist, bad_image_log=self.out / "bad_images.txt")
        self.batches_per_epoch = self.data.samples_per_rank // cfg.optim.batch_size
        self.steps_per_epoch = self.batches_per_epoch // cfg.optim.accum_steps
        if self.steps_per_epoch < 1:
            raise SyncoError(
                f"the dataset has {self.data.epoch_size} images per epoch, fewer than one optimizer step needs "
                f"({self.effective_batch} = batch {cfg.optim.batch_size} x {self.world} processes x "
                f"{cfg.optim.accum_steps} accumulation steps); lower optim.batch_size.")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.synthetic_epochs = synthetic_window(cfg)  # [start, end) of the epochs with synthetic negatives

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = create_model(cfg).to(self.device)
        if self.world > 1:
            self.model.online = convert_sync_batchnorm(self.model.online, self.device)
            self.model.target = convert_sync_batchnorm(self.model.target, self.device)
        self.online = self.model.online
        if self.world > 1:
            # Every BatchNorm is synchronised, so its running statistics agree on all ranks without a broadcast.
            self.online = DDP(self.model.online, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                              broadcast_buffers=False, gradient_as_bucket_view=True)
        self.peak_lr = schedules.scaled_lr(cfg.optim.base_lr, self.effective_batch)
        self.optimizer = create_optimizer(self.model, cfg.optim, self.peak_lr, self.device)
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.scheduler = create_scheduler(self.optimizer, self.total_steps, self.warmup_steps, cfg.optim.min_lr)
        if cfg.compile:
            self.online = torch.compile(self.online)
            self.model.compile_target_and_loss()
        self.state = RunState()
        self.ckpt_path = self.out / "checkpoint.pt"
        self.writer = ckpt.CheckpointWriter()
        self.last_save = time.monotonic()
        self.last_good_epoch: Optional[int] = None
        self.throughput = ckpt.Throughput(self.effective_batch)  # per-segment images/seconds, in checkpoints

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint the current step (rank 0), written in the background: :meth:`wait_saved` waits for it."""
        self.last_save = time.monotonic()
        if not self.dist.is_main:
            return
        st = self.state
        state = ckpt.training_state(model=self.model, optimizer=self.optimizer, step=st.step, epoch=st.epoch,
                                    batch_in_epoch=st.batch_in_epoch, config=self.cfg.to_dict(),
                                    world_size=self.world, global_batch=self.global_batch,
                                    segments=self.throughput.segments(st.step))
        self.writer.save(state, self.ckpt_path)

    def wait_saved(self) -> None:
        """Return once the last checkpoint is on disk (re-raising its write error)."""
        self.writer.wait()

    def _checkpoint_due(self, logged: bool) -> bool:
        """A mid-epoch checkpoint every ``ckpt_every_steps`` steps, and every ``ckpt_every_minutes`` checked at the
        logged steps only: there every rank has just agreed that the loss is finite, so rank 0 may decide by its
        own clock without another collective."""
        cfg = self.cfg
        if cfg.ckpt_every_steps and self.state.step % cfg.ckpt_every_steps == 0:
            return True
        return bool(logged and cfg.ckpt_every_minutes
                    and time.monotonic() - self.last_save >= 60 * cfg.ckpt_every_minutes)

    def maybe_resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        if not self.cfg.resume:
            raise SyncoError(f"'{self.out}' already holds a checkpoint; use resume=true to continue it, "
                             "or choose another --out.")
        state = ckpt.load_training_state(self.ckpt_path)
        saved_cfg = with_defaults(state.get("config", {}))
        if saved_cfg.get("model", {}).get("backbone") != self.cfg.model.backbone:
            raise SyncoError(f"'{self.ckpt_path}' was trained with backbone "
                             f"'{saved_cfg.get('model', {}).get('backbone')}', but this run uses "
                             f"'{self.cfg.model.backbone}'. Use another --out or the same backbone.")
        diffs = [f"{d.key}: checkpoint {d.saved!r} vs now {d.current!r}"
                 for d in config_differences(saved_cfg, self.cfg.to_dict(), RESUMABLE_CHANGES)]
        if diffs:
            raise SyncoError(f"cannot resume '{self.ckpt_path}': the config differs from the one it was "
                             f"trained with ({'; '.join(diffs[:5])}). Use the same settings or another --out.")
        if state["global_batch"] != self.global_batch:
            raise SyncoError(f"cannot resume: the checkpoint's global batch is {state['global_batch']}, now it is "
                             f"{self.global_batch}. Keep optim.batch_size x processes unchanged.")
        load_state_checked(self.model, state["model"], f"checkpoint '{self.ckpt_path}'", self.cfg.model.backbone)
        self.optimizer.load_state_dict(state["optimizer"])
        self.state = RunState(state["step"], state["epoch"], state["batch_in_epoch"])
        if self.state.batch_in_epoch and state["world_size"] == self.world == 1:
            ckpt.set_rng_state(state["rng"])  # mid-epoch: continue the exact random stream
        self.last_good_epoch = self.state.epoch
        self.throughput.load(state.get("segments"))
        return True

    # -- training ---------------------------------------------------------------------------------

    def step(self, micro_batches: list, use_synthetic: bool) -> tuple[dict, float]:
        """One optimizer step over ``micro_batches`` (``accum_steps`` pairs of views) at the current schedules
        (see :func:`synco.engine.step.train_step`). Returns the summed statistics as device tensors (no host sync)
        with a ``loss`` key, and the EMA momentum used."""
        cfg, st = self.cfg, self.state
        self.scheduler.step_update(num_updates=st.step)
        # MoBY pulls the target towards the updated weights theta_{t+1} with m(t+1), not m(t).
        momentum = schedules.momentum_at(st.step + 1, self.total_steps, cfg.contrast.momentum_start)
        sums = train_step(self.model, self.online, self.optimizer, micro_batches, use_synthetic=use_synthetic,
                          momentum=momentum, clip_grad=cfg.optim.clip_grad, bf16=self.bf16, world=self.world)
        st.step += 1
        return sums, momentum

    def train(self) -> dict:
        """Run to the end, or until a step hook asks to stop (after a checkpoint)."""
        resumed = self.maybe_resume()  # replaces self.state: bind st only after it
        cfg, st = self.cfg, self.state
        if self.dist.is_main:
            save_config(cfg, self.out / "config.yaml")
        logger = MetricsLogger(self.out, enabled=self.dist.is_main, resume_step=st.step if resumed else None)
        bar = tqdm(total=self.total_steps, initial=st.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc=f"{cfg.method} pretrain")
        self.throughput.start(st.step)
        window = _MetricsWindow(self.world, self.throughput)
        self.model.train()
        stream = self.data.view_stream(st.epoch, st.batch_in_epoch, cfg.epochs,
                                       self.steps_per_epoch * cfg.optim.accum_steps, self.device)
        try:
            self._train_epochs(stream, logger, bar, window)
        except BaseException:
            self._wind_down(stream, failing=True)
            raise
        self._wind_down(stream)
        bar.close()
        logger.close()
        segments = self.throughput.segments(st.step)
        this = segments[-1] if self.throughput.start_step < st.step else {}  # this process's segment, if it trained
        return {"images_per_second": this.get("images_per_second", 0.0), "train_seconds": this.get("seconds", 0.0),
                "steps": st.step, "resumed": resumed, "segments": segments}

    def _wind_down(self, stream, failing: bool = False) -> None:
        """Stop the data workers and wait for the last checkpoint to be on disk, also when training failed. Then a
        failed write is only logged: the error that stopped training (a NaN, a signal) is the one to report."""
        stream.close()
        self.data.close()
        try:
            self.wait_saved()
        except Exception as e:  # noqa: BLE001 - reported, and the original error goes on
            if not failing:
                raise
            logging.getLogger("synco").error("the last checkpoint could not be written: %s", e)

    def _train_epochs(self, stream, logger: MetricsLogger, bar, window: _MetricsWindow) -> None:
        """The epochs left, their pairs of views taken from ``stream`` in order (see ``PretrainData.view_stream``).
        An epoch ends with its checkpoint, record and hooks; a step hook's stop ends training after that step's
        checkpoint (the epoch's, on its last step)."""
        cfg, st = self.cfg, self.state
        n_batches = self.steps_per_epoch * cfg.optim.accum_steps
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        while st.epoch < cfg.epochs:
            epoch = st.epoch
            if st.batch_in_epoch == 0:
                seed_all(epoch_seed(cfg, self.dist.rank, epoch))
            use_syn = schedules.synthetic_active(epoch, self.synthetic_epochs)
            stop = self._epoch_steps(stream, epoch, use_syn, n_batches, logger, bar, window)
            if st.batch_in_epoch == n_batches:
                self._end_epoch(epoch, logger, window)
            if stop:
                return

    def _epoch_steps(self, stream, epoch: int, use_syn: bool, n_batches: int, logger, bar, window) -> bool:
        """The optimizer steps left in ``epoch``, ``accum_steps`` micro-batches each; True when a step hook asked
        to stop."""
        micro: list = []
        for views in itertools.islice(stream, n_batches - self.state.batch_in_epoch):
            micro.append(views)
            if len(micro) < self.cfg.optim.accum_steps:
                continue
            if self._one_step(micro, epoch, use_syn, n_batches, logger, bar, window):
                return True
            micro = []
        return False

    def _one_step(self, micro: list, epoch: int, use_syn: bool, n_batches: int, logger, bar, window) -> bool:
        """One optimizer step and what follows it: hooks, the log record, a mid-epoch checkpoint, signals."""
        cfg, st = self.cfg, self.state
        # -- the step (device work only: its statistics stay on the device until logged)
        sums, momentum = self.step(micro, use_syn)
        self._nonfinite |= ~torch.isfinite(sums["loss"])
        window.add(sums, len(micro), len(micro) * micro[0][0].shape[0] * self.world)
        st.batch_in_epoch += len(micro)
        bar.update(1)
        # -- hooks and the log record (the only host sync, every log_every steps)
        stop = any([hook(self) for hook in self.step_hooks])  # every hook sees every step
        logged = st.step % cfg.log_every == 0 or st.step == self.total_steps
        if logged:
            self._check_finite(self._nonfinite)
            record = {"step": st.step, "epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                      "momentum": momentum, "synthetic": int(use_syn), **window.flush()}
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", ep=epoch, syn=int(use_syn))
        # -- a mid-epoch checkpoint (the epoch's own comes at its end)
        if st.batch_in_epoch < n_batches and (stop or self._checkpoint_due(logged)):
            if not logged:
                self._check_finite(self._nonfinite)
            self.save()
        # -- SIGTERM/SIGINT: keep the progress since the last checkpoint, then stop
        signum = sig.stop_requested(st.step, self.world, self.device, cfg.log_every)
        if signum:
            self._check_finite(self._nonfinite)
            self.save()
            bar.close()
            logger.close()
            raise sig.stopped(signum, st.step, st.epoch, self.ckpt_path)
        return stop

    def _end_epoch(self, epoch: int, logger: MetricsLogger, window: _MetricsWindow) -> None:
        """The epoch's checkpoint, its record (image counts) and the epoch hooks (the k-NN monitor)."""
        st = self.state
        st.epoch, st.batch_in_epoch = epoch + 1, 0
        self._check_finite(self._nonfinite)
        self.save()
        self.last_good_epoch = st.epoch
        if self.dist.is_main:
            real, synthetic = self.data.counts
            logger.log({"step": st.step, "epoch": epoch, "epoch_end": True, "real_images": real,
                        "synthetic_images": synthetic, "bad_images": self.data.bad_images()})
        self._run_epoch_hooks(epoch, logger, window)

    def _run_epoch_hooks(self, epoch: int, logger: MetricsLogger, window: _MetricsWindow) -> None:
        for hook in self.epoch_hooks:
            t_hook = time.perf_counter()
            record = hook(self, epoch)
            self.model.train()
            self.throughput.exclude(time.perf_counter() - t_hook)  # evaluation time is not training throughput
            if record:
                logger.log({"step": self.state.step, "epoch": epoch, **record})

    def _check_finite(self, bad: torch.Tensor) -> None:
        if self.world > 1:
            flag = bad.clone().to(torch.int)
            torch.distributed.all_reduce(flag)
            bad = flag > 0
        if bool(bad):
            kept = (f"the last good checkpoint (epoch {self.last_good_epoch}) is kept in {self.ckpt_path}"
                    if self.last_good_epoch is not None else "no checkpoint had been written yet")
            raise NonFiniteLoss(
                f"the loss became NaN or infinite before step {self.state.step} (epoch {self.state.epoch}); "
                f"stopping without saving the broken weights: {kept}. Lower optim.base_lr, set "
                "optim.clip_grad, or try precision=fp32.")

    def export(self) -> Path:
        path = self.out / "backbone.safetensors"
        if self.dist.is_main:
            export_safetensors(self.model.online.backbone, backbone_meta(self.cfg.model), path)
        return path


class _MetricsWindow:
    """Statistics summed on the device between two log records, read (one host sync) only when logged. Each
    key is averaged over the micro-batches that produced it: synthetic-negative statistics exist only inside
    the window of epochs that uses them, which a log window may straddle. Its images/s is timed on the run's
    one training clock (:class:`~synco.engine.checkpoint.Throughput`, which leaves evaluation time out)."""

    def __init__(self, world: int, clock: ckpt.Throughput):
        self.world, self.clock = world, clock
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.started = clock.seconds()

    def add(self, sums: dict, n_micro: int, images: int) -> None:
        for key, v in sums.items():
            self.sums[key] = self.sums.get(key, 0) + v
            self.counts[key] = self.counts.get(key, 0) + n_micro
        self.images += images

    def flush(self) -> dict:
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys])
        if self.world > 1:  # log the global-batch average, not rank 0's share
            torch.distributed.all_reduce(values)
            values /= self.world
        record = {k: float(v) / self.counts[k] for k, v in zip(keys, values.tolist())}
        now = self.clock.seconds()
        record["images_per_second"] = self.images / max(now - self.started, 1e-9)
        self.sums, self.counts, self.images, self.started = {}, {}, 0, now
        return record
