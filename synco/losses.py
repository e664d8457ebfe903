"""Losses of the three methods, as pure functions of L2-normalised features."""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
             synthetic: Optional[torch.Tensor] = None,
             synthetic_slices: Optional[Mapping[str, slice]] = None) -> tuple[torch.Tensor, dict]:
    """InfoNCE of Eq. (1) over [positive, K queue negatives, synthetic negatives] (Algorithm 1).

    Args:
        q: ``[B, C]`` normalised queries.
        k: ``[B, C]`` their normalised positive keys.
        queue: ``[K, C]`` normalised negatives shared by all queries.
        temperature: tau.
        synthetic: optional ``[B, S, C]`` per-query negatives.
        synthetic_slices: the slots of ``synthetic`` each type fills, by name (for per-type statistics).

    Returns:
        The mean loss (a scalar) and detached scalar statistics: mean positive cosine, mean hardest queue cosine,
        the fraction of queries whose hardest queue entry beats their positive and of queue entries that do, and
        for synthetic negatives their mean cosine (overall and per type, Section 8 of SynBY) and how often one
        beats the positive.

    The logits are float32 whatever the autocast state: bf16 resolves a cosine to about 0.004 (0.02 in a logit at
    tau 0.2), while hard and synthetic negatives sit within about 0.02 of the positive.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _info_nce(q.float(), k.float(), queue.float(), temperature,
                         None if synthetic is None else synthetic.float(), synthetic_slices)


def _info_nce(q, k, queue, temperature, synthetic, synthetic_slices) -> tuple[torch.Tensor, dict]:
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    parts = [l_pos, l_neg]
    pos, hardest = l_pos.detach(), l_neg.detach().max(dim=1, keepdim=True).values
    # frac_queue_above_pos: queries whose hardest queue entry beats the positive; frac_negatives_above_pos: the
    # share of all queue entries that do (on digits the hardest one is often the same digit, written alike).
    stats = {"sim_pos": pos.mean(), "sim_hardest_neg": hardest.mean(),
             "frac_queue_above_pos": (hardest > pos).float().mean(),
             "frac_negatives_above_pos": (l_neg.detach() > pos).float().mean()}
    if synthetic is not None and synthetic.shape[1] > 0:
        l_syn = torch.einsum("bc,bsc->bs", q, synthetic)
        parts.append(l_syn)
        syn = l_syn.detach()
        stats["sim_synthetic"] = syn.mean()
        stats["frac_synthetic_above_pos"] = (syn > pos).float().mean()
        for name, span in (synthetic_slices or {}).items():
            if span.stop > span.start:
                stats[f"sim_syn_{name}"] = syn[:, span].mean()
    logits = torch.cat(parts, dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), stats


def chance_loss(num_negatives: int) -> float:
    """InfoNCE when the positive is no more similar than any negative: ln(1 + negatives) (one view)."""
    return math.log(1 + num_negatives)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """BYOL regression loss 2 - 2 cos(p, z) (the MSE of normalised vectors), averaged over the batch.

    Args:
        p: ``[B, C]`` online predictions (any norm).
        z: ``[B, C]`` target projections of the other view (any norm).

    Returns:
        The mean loss (a scalar in [0, 4]) and ``{"sim_pos": mean cosine}`` (detached).
    """
    with torch.autocast(device_type=p.device.type, enabled=False):
        p, z = F.normalize(p.float(), dim=1), F.normalize(z.float(), dim=1)
        cos = (p * z).sum(dim=1)
        return (2.0 - 2.0 * cos).mean(), {"sim_pos": cos.detach().mean()}
