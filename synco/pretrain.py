"""One pretraining run end to end: train, export the backbone, k-NN evaluate, write ``summary.json``.

It sits above the engine and the evaluation protocols, which it combines."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config
from .engine import dist as D
from .engine.train import Trainer
from .eval.run_summary import evaluate_run
from .io import atomic_write_text


def pretrain(cfg: Config, out_dir: Path, progress: bool = True) -> dict:
    """Train, export the backbone, evaluate k-NN, write ``summary.json``; returns the summary."""
    trainer = Trainer(cfg, out_dir, progress=progress)
    result = trainer.train()
    trainer.export()
    summary = {"method": cfg.method, "backbone": cfg.model.backbone, "epochs": cfg.epochs,
               "steps": result["steps"], "world_size": trainer.world, "global_batch": trainer.global_batch,
               "effective_batch": trainer.effective_batch, "peak_lr": trainer.peak_lr,
               "images_per_second": result["images_per_second"], "train_seconds": result["train_seconds"],
               "bad_images": trainer.data.bad_images()}
    if cfg.knn_at_end:
        summary.update(evaluate_run(cfg, trainer.model.online.backbone, trainer.device, progress=progress))
    if trainer.dist.is_main:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", Path(out_dir) / "summary.json")
    D.barrier()
    return summary

