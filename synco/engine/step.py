"""One optimizer step of the self-supervised model: the trainer runs it, and ``synco eval efficiency`` times the
very same code (so the cost table measures what training does, not a copy of it).

Order within the step, as MoBY's: each micro-batch's forward, backward and enqueue (its keys join the queues at
once, as with gradient accumulation in the authors' code), then gradient clipping, AdamW and the EMA of the target
with the momentum of the *next* step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import dist


def _no_mark(part: str) -> None:
    pass


def train_step(model: nn.Module, online: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, *,
               use_synthetic: bool, momentum: float, clip_grad: Optional[float], bf16: bool, world: int = 1,
               mark: Callable[[str], None] = _no_mark) -> dict[str, torch.Tensor]:
    """Forward, backward and enqueue each micro-batch, then clip, step the optimizer and update the target.

    Args:
        model: the :class:`~synco.models.method.SelfSupervisedModel`.
        online: ``model.online`` or its DDP / ``torch.compile`` wrapper (the module the gradients go through).
        micro_batches: ``accum_steps`` pairs of views ``(x1, x2)``, each ``[B, 3, H, W]`` on the model's device, or
            triples ``(x1, x2, labels)`` with the images' classes (``[B]``, -1 unknown), which only diagnostics read.
        use_synthetic: whether synthetic hard negatives join the loss (inside the window of epochs).
        momentum: EMA momentum for the target after this step.
        clip_grad: max gradient norm of the online encoder (0 or None: no clipping).
        bf16: bf16 autocast for the forward passes.
        world: processes in the job; gradients are all-reduced only on the last micro-batch.
        mark: called with the name of each part of the step as it ends ("loss (rest of forward)", "backward",
            "optimizer, EMA, enqueue"), for timing; the encoders' own hooks mark the forward passes.

    Returns:
        The micro-batches' summed statistics as float32 device scalars (no host sync), with a ``loss`` key.
    """
    sums: dict[str, torch.Tensor] = {}
    for i, (x1, x2, *labels) in enumerate(micro_batches):
        labels = labels[0] if labels else None
        last = i == len(micro_batches) - 1
        ctx = online.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
        with ctx:
            with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=bf16):
                q1, q2 = online(x1, x2)
                loss, stats, (k1, k2) = model.loss(q1, q2, x1, x2, use_synthetic=use_synthetic, labels=labels)
            mark("loss (rest of forward)")
            (loss / len(micro_batches)).backward()
            mark("backward")
        model.enqueue(dist.all_gather_cat(k1), dist.all_gather_cat(k2),
                      None if labels is None else dist.all_gather_cat(labels))
        stats["loss"] = loss.detach()
        for key, v in stats.items():
            sums[key] = sums.get(key, 0) + v.float()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.online.parameters(), clip_grad, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.momentum_update(momentum)
    mark("optimizer, EMA, enqueue")
    return sums
