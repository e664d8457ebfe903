"""Schedules as pure functions of the global optimizer step, so a resumed run continues them exactly.

The learning rate itself is driven by timm's ``CosineLRScheduler`` (see ``engine.optim``);
``lr_at`` is the closed form it must match, used by the tests.
"""

from __future__ import annotations

import math


def momentum_at(step: int, total_steps: int, m_start: float) -> float:
    """Target EMA momentum m = 1 - (1 - m_start) * (cos(pi k / K) + 1) / 2 (MoBY/BYOL)."""
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - m_start) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warm-up from 0 to ``peak_lr``, then cosine decay to ``min_lr``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * min(t, 1.0)))


def scaled_lr(base_lr: float, effective_batch: int, reference_batch: int = 512) -> float:
    """Linear scaling rule: ``base_lr`` is quoted per ``reference_batch`` images."""
    return base_lr * effective_batch / reference_batch


def synthetic_active(epoch: int, window: tuple[int, int]) -> bool:
    """Synthetic negatives are used for epochs in [start, end) (warm-up and cool-down excluded)."""
    start, end = window
    return start <= epoch < end
