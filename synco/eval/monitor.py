"""The k-NN monitor: every ``knn_every`` epochs, k-NN top-1 of the online backbone on the held-out split,
so a run has a learning curve (as solo-learn's online k-NN callback gives), not just an end point."""

from __future__ import annotations

from typing import Optional

from .knn import top1_at
from .run_summary import knn_datasets, knn_of


def knn_monitor(cfg) -> Optional[callable]:
    """An epoch hook for :class:`synco.engine.train.Trainer`, or None when off or the data has no val split."""
    if cfg.knn_every <= 0:
        return None
    sets = knn_datasets(cfg)  # built once: only the features change between calls
    if sets is None:
        return None
    train, test = sets

    def hook(trainer, epoch: int) -> Optional[dict]:
        if (epoch + 1) % cfg.knn_every and epoch + 1 != cfg.epochs:
            return None
        results = knn_of(trainer.model.online.backbone, train, test, cfg, trainer.device, progress=False)
        return {"knn_top1": top1_at(results, 20)}

    return hook
