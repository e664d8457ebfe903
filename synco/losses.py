"""Losses of the three methods, as pure functions of L2-normalised features."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .hard_negatives import cancel_false_negatives_loss, reweighted_loss


@dataclass(frozen=True)
class Strategy:
    """How the contrastive loss treats its negatives (the maths is :mod:`synco.hard_negatives`'s): an importance
    reweighting of the denominator (``reweight``: none, hcl, debiased, with ``beta`` and ``tau_plus``), and what is
    done with the queue entries taken for false negatives (``cancel``: none, eliminate, attract; found with ``top_k``
    and ``threshold``; ``filter_hard_set``: none of them feeds the synthetic negatives)."""

    reweight: str = "none"
    beta: float = 0.0
    tau_plus: float = 0.0
    cancel: str = "none"
    top_k: int = 10
    threshold: Optional[float] = 0.7
    filter_hard_set: bool = False

    @property
    def detects_false_negatives(self) -> bool:
        return self.cancel != "none" or self.filter_hard_set

    @property
    def plain(self) -> bool:
        """InfoNCE itself: every negative once, one positive."""
        return self.reweight == "none" and self.cancel == "none"


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
             synthetic: Optional[torch.Tensor] = None, synthetic_slices: Optional[Mapping[str, slice]] = None, *,
             strategy: Optional[Strategy] = None, false_neg: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None,
             queue_labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """InfoNCE of Eq. (1) over [positive, K queue negatives, synthetic negatives] (Algorithm 1), or another
    hard-negative strategy's loss over the same logits.

    Args:
        q: ``[B, C]`` normalised queries.
        k: ``[B, C]`` their normalised positive keys.
        queue: ``[K, C]`` normalised negatives shared by all queries.
        temperature: tau.
        synthetic: optional ``[B, S, C]`` per-query negatives.
        synthetic_slices: the slots of ``synthetic`` each type fills, by name (for per-type statistics).
        strategy: how the negatives count (default: InfoNCE).
        false_neg: ``[B, K]`` bool, queue entries taken for false negatives of each query (strategy.cancel).
        labels, queue_labels: ``[B]`` and ``[K]`` classes (-1: unknown), for diagnostics only.

    Returns:
        The mean loss (a scalar) and detached scalar statistics: mean positive cosine, mean hardest queue cosine,
        the fraction of queries whose hardest queue entry beats their positive and of queue entries that do, how
        many negatives beat it per query, for synthetic negatives their mean cosine (overall and per type, Section
        8 of SynBY) and how often one beats the positive; the strategy's own diagnostics; with labels, the share
        of the queue entries above the positive that are of the query's class, and the false-negative detector's
        precision.

    The logits are float32 whatever the autocast state: bf16 resolves a cosine to about 0.004 (0.02 in a logit at
    tau 0.2), while hard and synthetic negatives sit within about 0.02 of the positive.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        syn = None if synthetic is None or synthetic.shape[1] == 0 else synthetic.float()
        l_pos, l_neg, l_syn = _cosines(q.float(), k.float(), queue.float(), syn)
        stats = _statistics(l_pos, l_neg, l_syn, synthetic_slices)
        if labels is not None and queue_labels is not None:
            stats.update(_class_diagnostics(l_pos, l_neg, labels, queue_labels, false_neg))
        if strategy is None or strategy.plain:
            logits = torch.cat([l_pos, l_neg] + ([l_syn] if l_syn is not None else []), dim=1) / temperature
            labels0 = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            loss = F.cross_entropy(logits, labels0)
        else:
            loss = _strategy_loss(strategy, l_pos, l_neg, l_syn, temperature, false_neg, stats)
        if false_neg is not None:
            stats["fnc_flagged"] = false_neg.sum(1).float().mean()
        return loss, stats


def _cosines(q, k, queue, synthetic):
    """``[B, 1]`` positive, ``[B, K]`` queue and ``[B, S]`` synthetic cosines (None without synthetic negatives).
    Made in this order: autograd sums q's gradients in the order of its graph, and every committed result was made
    with this one (another order changes the weights in the last bits)."""
    l_pos, l_neg = (q * k).sum(dim=1, keepdim=True), q @ queue.t()
    return l_pos, l_neg, None if synthetic is None else torch.einsum("bc,bsc->bs", q, synthetic)


@torch.no_grad()
def _statistics(l_pos, l_neg, l_syn, synthetic_slices) -> dict:
    pos, hardest = l_pos, l_neg.max(dim=1, keepdim=True).values
    # frac_queue_above_pos: queries whose hardest queue entry beats the positive; frac_negatives_above_pos: the
    # share of all queue entries that do (on digits the hardest one is often the same digit, written alike).
    above = (l_neg > pos).float()
    stats = {"pos_cos": pos.mean(), "hardest_neg_cos": hardest.mean(),
             "frac_queue_above_pos": (hardest > pos).float().mean(), "frac_negatives_above_pos": above.mean(),
             "negatives_above_pos": above.sum(1).mean()}
    if l_syn is not None:
        stats["synthetic_cos"] = l_syn.mean()
        stats["frac_synthetic_above_pos"] = (l_syn > pos).float().mean()
        stats["negatives_above_pos"] = stats["negatives_above_pos"] + (l_syn > pos).float().sum(1).mean()
        for name, span in (synthetic_slices or {}).items():
            if span.stop > span.start:
                stats[f"synthetic_cos_{name}"] = l_syn[:, span].mean()
    return stats


@torch.no_grad()
def _class_diagnostics(l_pos, l_neg, labels, queue_labels, false_neg) -> dict:
    """With classes known: the share of the queue entries above the positive that are of the query's class (false
    negatives among the hardest), the same share over the whole queue (its chance level), and the false-negative
    detector's precision. Entries of unknown class (-1) are left out of every share."""
    known = (queue_labels[None, :] >= 0) & (labels[:, None] >= 0)
    same = (queue_labels[None, :] == labels[:, None]) & known
    above = (l_neg > l_pos) & known
    out = {"same_class_above_pos": (same & above).sum() / above.sum().clamp_min(1),
           "same_class_in_queue": same.sum() / known.sum().clamp_min(1)}
    if false_neg is not None:
        flagged = false_neg & known
        out["fnc_precision"] = (flagged & same).sum() / flagged.sum().clamp_min(1)
    return {k: v.float() for k, v in out.items()}


def _strategy_loss(strategy: Strategy, l_pos, l_neg, l_syn, temperature, false_neg, stats: dict) -> torch.Tensor:
    """The mean loss of a strategy other than plain InfoNCE (synco.hard_negatives); its diagnostics go to ``stats``."""
    pos = l_pos[:, 0]
    neg = l_neg if l_syn is None else torch.cat([l_neg, l_syn], dim=1)
    if strategy.cancel != "none" and false_neg is None:
        raise ValueError(f"strategy cancel={strategy.cancel} needs the false negatives (false_neg)")
    if strategy.cancel == "attract":
        loss, hs = cancel_false_negatives_loss(pos, neg, false_neg, temperature, "attract")
    elif strategy.reweight != "none":
        keep = None
        if strategy.cancel == "eliminate":
            keep = torch.ones_like(neg, dtype=torch.bool)
            keep[:, : false_neg.shape[1]] = ~false_neg
        loss, hs = reweighted_loss(pos, neg, temperature, strategy.beta, strategy.tau_plus, keep)
    else:
        loss, hs = cancel_false_negatives_loss(pos, neg, false_neg, temperature, "eliminate")
    for name in ("clamped", "top_weight"):
        if getattr(hs, name) is not None:
            stats[f"hcl_{name}"] = getattr(hs, name)
    return loss.mean()


def chance_loss(num_negatives: int) -> float:
    """InfoNCE when the positive is no more similar than any negative: ln(1 + negatives) (one view)."""
    return math.log(1 + num_negatives)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """BYOL regression loss 2 - 2 cos(p, z) (the MSE of normalised vectors), averaged over the batch.

    Args:
        p: ``[B, C]`` online predictions (any norm).
        z: ``[B, C]`` target projections of the other view (any norm).

    Returns:
        The mean loss (a scalar in [0, 4]) and ``{"pos_cos": mean cosine}`` (detached).
    """
    with torch.autocast(device_type=p.device.type, enabled=False):
        p, z = F.normalize(p.float(), dim=1), F.normalize(z.float(), dim=1)
        cos = (p * z).sum(dim=1)
        return (2.0 - 2.0 * cos).mean(), {"pos_cos": cos.detach().mean()}
