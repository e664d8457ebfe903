"""Losses of the three methods, as pure functions of L2-normalised features."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
             synthetic: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """InfoNCE of Eq. (1) over [positive, K queue negatives, synthetic negatives] (Algorithm 1).

    q, k: [B, C] normalised queries and their positive keys; queue: [K, C] normalised negatives;
    synthetic: optional [B, S, C] per-query negatives. Returns the mean loss and detached statistics
    (mean positive cosine, mean hardest real-negative cosine, mean synthetic cosine).
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    parts = [l_pos, l_neg]
    stats = {"sim_pos": l_pos.detach().mean(), "sim_hardest_neg": l_neg.detach().max(dim=1).values.mean()}
    if synthetic is not None and synthetic.shape[1] > 0:
        l_syn = torch.einsum("bc,bsc->bs", q, synthetic.to(q.dtype))
        parts.append(l_syn)
        stats["sim_synthetic"] = l_syn.detach().mean()
    logits = torch.cat(parts, dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.float(), labels), stats


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """BYOL regression loss 2 - 2 cos(p, z) (the MSE of normalised vectors), averaged over the batch."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.float(), dim=1)
    cos = (p * z).sum(dim=1)
    return (2.0 - 2.0 * cos).mean(), {"sim_pos": cos.detach().mean()}
