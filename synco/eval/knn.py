"""Weighted k-NN on frozen features (Wu et al. 2018 / DINO): cosine similarity, weights exp(s / T).

Similarities are computed block by block (test chunk x train chunk) with a running top-k merge, so
no test x train matrix is ever held in memory, whatever the size of the bank.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..errors import SyncoError
from .features import ShardSampler, extract_features, feature_loader, predict  # noqa: F401 (re-exported)


def check_knn_inputs(ks: Sequence[int], temperature: float, num_classes: Optional[int] = None) -> None:
    """Reject settings whose numbers would be meaningless (k < 1, a non-positive temperature, one class)."""
    invalid = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if not len(ks) or invalid:
        raise SyncoError(f"k-NN: every k must be an integer >= 1 (got k={list(ks)}); e.g. k=[10, 20, 100, 200].")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise SyncoError(f"k-NN: the temperature must be a finite number > 0, got {temperature!r}.")
    if num_classes is not None and num_classes < 2:
        raise SyncoError(f"k-NN needs at least two classes, but the data has {num_classes}: with one class "
                         "every prediction is right by construction, so the accuracy would be a meaningless 100 %.")


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: Optional[int] = None, test_chunk: int = 256, train_chunk: int = 65536
                 ) -> dict[int, dict[str, float]]:
    """Top-1/top-5 accuracy (%) of weighted k-NN for each k; features must be L2-normalised.

    Classes are ranked by their summed weights exp(s/T), computed as a log-sum-exp per class so that no
    temperature overflows (ties: the lower class index first, as a stable sort gives). Only classes that
    received a vote can be predicted: with k < 5 neighbours fewer than five classes are candidates, and top-5
    never counts a class no neighbour voted for."""
    device = train_features.device
    num_classes = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    check_knn_inputs(list(ks), temperature, num_classes)
    if int(torch.unique(train_labels).numel()) < 2:
        raise SyncoError("k-NN needs at least two classes in the training features, but all carry one label: "
                         "the accuracy would be a meaningless 100 %.")
    n_train = train_features.shape[0]
    ks = sorted({min(int(k), n_train) for k in ks})
    kmax = ks[-1]
    correct = {k: torch.zeros(2, device=device) for k in ks}
    for start in range(0, test_features.shape[0], test_chunk):
        q = test_features[start:start + test_chunk].to(device)
        y = test_labels[start:start + test_chunk].to(device)
        best_s = torch.full((q.shape[0], 0), -2.0, device=device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        for t0 in range(0, n_train, train_chunk):
            s = q @ train_features[t0:t0 + train_chunk].t()
            s, i = s.topk(min(kmax, s.shape[1]), dim=1)
            best_s, pos = torch.cat([best_s, s], 1).topk(min(kmax, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + t0], 1).gather(1, pos)
        neighbour_labels = train_labels.to(device)[best_i]  # [b, kmax], sorted by similarity
        for k in ks:
            votes = class_log_votes(best_s[:, :k] / temperature, neighbour_labels[:, :k], num_classes)
            voted = torch.isfinite(votes)
            ranked = torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :min(5, num_classes)]
            hit = (ranked == y[:, None]) & voted.gather(1, ranked)
            correct[k] += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).float()
    n = test_features.shape[0]
    return {k: {"top1": 100.0 * float(c[0]) / n, "top5": 100.0 * float(c[1]) / n} for k, c in correct.items()}


def class_log_votes(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log of each class's summed weight exp(s/T) over the neighbours ``[b, k]``, -inf for a class without a
    vote. A log-sum-exp per class (each class's largest logit subtracted before exp): at a small temperature
    exp(s/T) overflows float32 to inf for several classes, which then tie and the lowest index wins, or
    underflows to 0 and ties the weaker classes. The ranking is the same as by the summed weights."""
    logits = logits.double()  # exp of differences down to -745 stays above 0
    top = torch.full((logits.shape[0], num_classes), float("-inf"), dtype=logits.dtype, device=logits.device)
    top.scatter_reduce_(1, labels, logits, reduce="amax")
    sums = torch.zeros_like(top).scatter_add_(1, labels, (logits - top.gather(1, labels)).exp())
    return top + sums.log()  # a class without a vote: -inf + log(0) = -inf


def knn_table(results: dict[int, dict[str, float]]) -> str:
    lines = ["| k | top-1 (%) | top-5 (%) |", "|---|---|---|"]
    lines += [f"| {k} | {r['top1']:.2f} | {r['top5']:.2f} |" for k, r in sorted(results.items())]
    return "\n".join(lines)


def nearest_k(results: dict, k: int = 20):
    """The key of ``results`` (int or str) whose k is closest to ``k``: ``k`` itself when it was evaluated."""
    return min(results, key=lambda key: (abs(int(key) - k), int(key)))


def top1_at(results: dict, k: int = 20) -> float:
    """Top-1 of the k-NN with ``k`` neighbours (the papers report k=20), or of the evaluated k closest to it.
    Not the best over k: picking the best k on the test set would flatter the number."""
    return results[nearest_k(results, k)]["top1"]
