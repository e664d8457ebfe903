"""One pretraining run end to end: train, export the backbone, k-NN evaluate, write ``summary.json``.

It sits above the engine and the evaluation protocols, which it combines."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .config import Config
from .device import environment, resolve_device
from .engine import dist, signals
from .engine.checkpoint import throughput_totals
from .engine.metrics import TRAINING_NUMBERS, read_jsonl, training_summary
from .engine.train import Trainer
from .eval.knn_protocol import KNN_NUMBERS, KNN_PERCENTS, evaluate_run, knn_monitor
from .eval.results import number_problem
from .io import DirLock, atomic_write_text, check_output_dir, remove_stale_temps
from .losses import chance_loss
from .methods import method_spec, synthetic_window
from .models.backbone import SYNCO_ONLY_EXPORT, backbone_meta, export_safetensors

logger = logging.getLogger("synco")

# Every number summary.json can hold at its top level: what a sweep may aggregate (its spec's metrics:) and what
# must be a finite number (or null) for the file to count as a finished run's.
SUMMARY_NUMBERS = ("epochs", "steps", "world_size", "global_batch", "effective_batch", "peak_lr", "images_per_second",
                   "train_seconds", "train_images", "bad_images", *TRAINING_NUMBERS, *KNN_NUMBERS)


def summary_damage(summary: dict) -> list[str]:
    """The keys of a read-back ``summary.json`` whose value is no finite number, or an accuracy outside [0, 100]: a
    file edited by hand or damaged (training never writes a NaN loss: it stops as diverged), whose numbers must not
    be averaged or dropped."""
    return [k for k in SUMMARY_NUMBERS
            if summary.get(k) is not None and number_problem(summary[k], percent=k in KNN_PERCENTS)]


def _launch_rank() -> int:
    """This process's rank, known from torchrun's environment before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def pretrain(cfg: Config, out_dir: Path, progress: bool = True) -> dict:
    """Train, export the backbone, evaluate k-NN, write ``summary.json``; returns the summary.

    Before any work: ``out_dir`` must be writable, and no other run may be using it (a lock file holding
    the PID; a killed run's lock does not block the resume). Temp files a killed run leaked are removed.
    SIGTERM/SIGINT during training write a checkpoint at the next step and stop with a message."""
    out_dir = Path(out_dir)
    resolve_device(cfg.device)  # a GPU recipe without a usable GPU stops here, before the folder is touched
    lock = None
    if _launch_rank() == 0:
        check_output_dir(out_dir, "--out")
        lock = DirLock(out_dir, "pretraining run").acquire()
    try:
        if lock is not None:
            for path in remove_stale_temps(out_dir):
                logger.warning("removed %s, a temp file left by an interrupted write", path)
        return _pretrain(cfg, out_dir, progress)
    finally:
        if lock is not None:
            lock.release()


def chance_loss_at_end(cfg: Config):
    """The summed two-view InfoNCE of features that carry no information, for the last epoch's negatives."""
    spec = method_spec(cfg)
    if not spec.uses_queue:
        return None
    start, end = synthetic_window(cfg)
    synthetic = sum(cfg.negatives.counts) if start <= cfg.epochs - 1 < end else 0
    return 2 * chance_loss(cfg.contrast.queue_size + synthetic)


def _pretrain(cfg: Config, out_dir: Path, progress: bool) -> dict:
    hooks = tuple(h for h in (knn_monitor(cfg),) if h is not None)
    trainer = Trainer(cfg, out_dir, progress=progress, epoch_hooks=hooks)
    with signals.deferred("training is complete (checkpoint written) but the backbone export, the k-NN "
                          "and summary.json are not: re-run the same command to finish them"):
        result = trainer.train()
    export_note = None
    if cfg.model.bn_before_mlp:
        # timm's ViT has LayerNorm where this backbone has BatchNorm: the README's timm route would load it
        # with untrained LayerNorms and no error. Write a file only synco's loader reads instead.
        if trainer.dist.is_main:
            export_safetensors(trainer.model.online.backbone, backbone_meta(cfg.model),
                               out_dir / SYNCO_ONLY_EXPORT, synco_only=True)
        export_note = (f"model.bn_before_mlp=true is not a timm architecture: no backbone.safetensors for timm; "
                       f"{SYNCO_ONLY_EXPORT} loads with synco.models.backbone.load_backbone(path)")
        logger.warning(export_note)
    else:
        trainer.export()
    totals = throughput_totals(result.get("segments") or [])
    summary = {"method": cfg.method, "backbone": cfg.model.backbone, "epochs": cfg.epochs,
               "steps": result["steps"], "world_size": trainer.world, "global_batch": trainer.global_batch,
               "effective_batch": trainer.effective_batch, "peak_lr": trainer.peak_lr,
               # over every training segment of the run (resumes included), not only this process's
               "images_per_second": totals["images_per_second"], "train_seconds": totals["train_seconds"],
               "train_images": totals["train_images"], "train_segments": totals["train_segments"],
               "bad_images": trainer.data.bad_images(), "environment": environment(trainer.device, trainer.world)}
    if trainer.dist.is_main:
        summary.update(training_summary(read_jsonl(out_dir / "metrics.jsonl"), chance_loss_at_end(cfg)))
    if export_note:
        summary["export_note"] = export_note
    if cfg.knn_at_end:
        summary.update(evaluate_run(cfg, trainer.model.online.backbone, trainer.device, progress=progress))
    if trainer.dist.is_main:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", Path(out_dir) / "summary.json")
    dist.barrier()
    return summary
