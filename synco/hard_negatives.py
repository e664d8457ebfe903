"""Hard-negative strategies beside SynCo's synthetic negatives: importance reweighting (HCL, debiased), false-negative
cancellation (FNC), and MoCHi as a named configuration of SynCo's rules. Pure maths on (q, k, queue) tensors.

Notation: for one query, ``p = q.k`` is the cosine of its positive, ``s_i = q.n_i`` those of its M negatives (queue
entries, and synthetic negatives when there are any), ``t`` the temperature.

**HCL** (Robinson et al., ICLR 2021, "Contrastive Learning with Hard Negative Samples"), as their code computes it
(github.com/joshr17/HCL, ``image/main.py``; the maintainers confirm the code over the appendix's pseudo-code)::

    w_i  = exp(beta s_i / t)                                      importance of negative i (no gradient stop)
    R    = sum_i w_i exp(s_i / t) / mean_i w_i                    = M sum_i softmax(beta s / t)_i exp(s_i / t)
    N_g  = max( (R - tau_plus M exp(p / t)) / (1 - tau_plus),  M exp(-1 / t) )
    loss = -log( exp(p / t) / (exp(p / t) + N_g) )

``tau_plus`` is the class prior (the chance that a negative is of the query's class: about 1 / classes), ``beta``
how much harder negatives weigh; the clamp is the smallest value N_g can take (every cosine -1). With
``beta = 0`` this is the **debiased** loss (Chuang et al., NeurIPS 2020, "Debiased Contrastive Learning",
github.com/chingyaoc/DCL), and with ``tau_plus = 0`` as well it is InfoNCE. beta multiplies ``s / t``: the same
tilt at another temperature is ``beta t' / t`` (their best beta = 1 at t = 0.5 is beta = 0.4 at t = 0.2). Computed in
log space (``logsumexp``), so no exponential overflows at any beta or t.

**False-negative cancellation** (Huynh et al., WACV 2022, "Boosting Contrastive Self-Supervised Learning with
False Negative Cancellation"; github.com/google-research/fnc, ``objective.py``). A queue entry is a likely false
negative of a query when it is among the ``top_k`` entries most similar to the query's image and above
``threshold``, the similarity being the largest cosine with any of the image's views (here its target keys: in
their code the image's views are its "support set", and with none beyond the two views this is what it reduces
to)::

    c_j = max_v k_v . n_j              F = top_k(c) and {j : c_j > threshold}

*Elimination* drops F from the denominator; *attraction* (their released method) counts F as positives, averaged
with the true one::

    eliminate:  loss = -log( exp(p/t) / (exp(p/t) + sum_{i not in F} exp(s_i/t)) )
    attract:    loss = logsumexp([p, s] / t) - (p + sum_{j in F} s_j) / (t (1 + |F|))

**MoCHi** (Kalantidis et al., NeurIPS 2020, "Hard Negative Mixing for Contrastive Learning") is SynCo's rule 3 (mix
two of the query's N hardest queue entries, ``g ~ U(0, 1)``) and rule 1 (mix the query with one of them, its
weight ``a ~ U(0, 0.5)``), L2-normalised, as extra negatives of that query only: :func:`mochi_negatives` gives the
:class:`~synco.negatives.SyntheticNegatives` arguments, with ``distinct_mix`` (the two hard negatives of a mix are
two different entries). Where it differs from SynCo's rules: only those two rules; ``alpha_max = 0.5`` is MoCHi's
bound on the query's weight; the pairs are distinct. The same in both: the hard set is each query's own top-N by
cosine, drawn with replacement across slots, normalised after mixing, detached, in the denominator only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["HardNegativeStats", "cancel_false_negatives_loss", "detect_false_negatives", "mochi_negatives",
           "reweighted_loss"]

MOCHI_FRACTIONS = (16, 32, 64)  # MoCHi (N, s, s') = (1024, 512, 256) at a 16,384-key queue: K/16, K/32, K/64


def mochi_negatives(queue_size: int, fractions: tuple[int, int, int] = MOCHI_FRACTIONS) -> dict:
    """:class:`~synco.negatives.SyntheticNegatives` arguments of MoCHi (N, s, s') scaled to ``queue_size``: the N
    hardest entries, s mixes of two of them (SynCo's rule 3), s' mixes with the query (rule 1, its weight below
    0.5); each at least 1."""
    n, s, s_prime = (max(1, queue_size // f) for f in fractions)
    return dict(n_hard=n, counts=(s_prime, 0, s, 0, 0, 0), alpha_max=0.5, distinct_mix=True)


@dataclass(frozen=True)
class HardNegativeStats:
    """Detached diagnostics of one strategy's loss (scalars, averaged over the queries)."""

    clamped: Optional[torch.Tensor] = None  # HCL/debiased: share of queries whose N_g hit its floor
    top_weight: Optional[torch.Tensor] = None  # HCL: the largest importance weight, relative to uniform (1 = none)
    cancelled: Optional[torch.Tensor] = None  # FNC: false negatives flagged per query


def reweighted_loss(pos: torch.Tensor, neg: torch.Tensor, temperature: float, beta: float, tau_plus: float,
                    keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, HardNegativeStats]:
    """HCL's loss per query (debiased with ``beta = 0``); see the module docstring for the equations.

    Args:
        pos: ``[B]`` cosines of the positives.
        neg: ``[B, M]`` cosines of the negatives.
        temperature: t.
        beta: concentration on hard negatives (>= 0).
        tau_plus: class prior in [0, 1).
        keep: optional ``[B, M]`` bool, the negatives that count (False: eliminated); M becomes each row's count.

    Returns:
        ``[B]`` losses (float32) and the clamp share and top importance weight.
    """
    pos, neg = pos.float(), neg.float()
    lp = pos / temperature
    if keep is None:
        m = torch.full_like(lp, neg.shape[1])
        masked = neg
    else:
        m = keep.sum(1).to(lp.dtype).clamp_min(1.0)
        masked = neg.masked_fill(~keep, -math.inf)
    tilt = beta * masked / temperature
    log_r = torch.logsumexp(tilt + masked / temperature, 1) - torch.logsumexp(tilt, 1) + m.log()
    ratio = (torch.exp(log_r - lp) - tau_plus * m) / (1.0 - tau_plus)  # N_g / exp(p / t)
    floor = m * torch.exp(-1.0 / temperature - lp)
    loss = torch.log1p(torch.maximum(ratio, floor))
    with torch.no_grad():
        top = torch.softmax(tilt, 1).amax(1) * m
        stats = HardNegativeStats(clamped=(ratio < floor).float().mean(), top_weight=top.mean())
    return loss, stats


@torch.no_grad()
def detect_false_negatives(keys: torch.Tensor, queue: torch.Tensor, top_k: int = 10,
                           threshold: Optional[float] = 0.7) -> torch.Tensor:
    """``[B, K]`` bool: the queue entries FNC takes for false negatives of each image.

    Args:
        keys: ``[V, B, C]`` normalised keys of each image's views (here the target's keys of both views).
        queue: ``[K, C]`` normalised queue.
        top_k: at most this many per image (0: no limit).
        threshold: only entries whose largest cosine with the image's views is above it (None: no threshold).
    """
    c = torch.einsum("vbc,kc->vbk", keys.float(), queue.float()).amax(0)
    flagged = torch.ones_like(c, dtype=torch.bool) if threshold is None else c > threshold
    if top_k and top_k < c.shape[1]:
        in_top = torch.zeros_like(flagged)
        in_top.scatter_(1, c.topk(top_k, dim=1).indices, True)
        flagged &= in_top
    return flagged


def cancel_false_negatives_loss(pos: torch.Tensor, neg: torch.Tensor, false_neg: torch.Tensor, temperature: float,
                                mode: str) -> tuple[torch.Tensor, HardNegativeStats]:
    """FNC's loss per query; see the module docstring.

    Args:
        pos: ``[B]`` cosines of the positives.
        neg: ``[B, M]`` cosines of the negatives; the first ``false_neg.shape[1]`` are the queue's.
        false_neg: ``[B, K]`` bool from :func:`detect_false_negatives` (K <= M; synthetic negatives are never
            flagged).
        temperature: t.
        mode: ``eliminate`` or ``attract``.
    """
    flagged = torch.zeros_like(neg, dtype=torch.bool)
    flagged[:, : false_neg.shape[1]] = false_neg
    logits = torch.cat([pos.float()[:, None], neg.float()], 1) / temperature
    if mode == "eliminate":
        logits = logits.masked_fill(torch.cat([torch.zeros_like(flagged[:, :1]), flagged], 1), -math.inf)
        loss = torch.logsumexp(logits, 1) - logits[:, 0]
    elif mode == "attract":
        positives = logits[:, 0] + (logits[:, 1:] * flagged).sum(1)
        loss = torch.logsumexp(logits, 1) - positives / (1.0 + flagged.sum(1))
    else:
        raise ValueError(f"mode must be eliminate or attract, got {mode!r}")
    return loss, HardNegativeStats(cancelled=false_neg.sum(1).float().mean())
