"""Weighted k-NN on frozen features (Wu et al. 2018 / DINO): cosine similarity, weights exp(s / T).

Similarities are computed block by block (test chunk x train chunk) with a running top-k merge, so
no test x train matrix is ever held in memory, whatever the size of the bank.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .features import ShardSampler, extract_features, feature_loader, predict  # noqa: F401 (re-exported)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: Optional[int] = None, test_chunk: int = 256, train_chunk: int = 65536
                 ) -> dict[int, dict[str, float]]:
    """Top-1/top-5 accuracy (%) of weighted k-NN for each k; features must be L2-normalised."""
    device = train_features.device
    num_classes = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
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
        weights = (best_s / temperature).exp()
        for k in ks:
            votes = torch.zeros(q.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            top = votes.topk(min(5, num_classes), dim=1).indices
            hit = top == y[:, None]
            correct[k] += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).float()
    n = test_features.shape[0]
    return {k: {"top1": 100.0 * float(c[0]) / n, "top5": 100.0 * float(c[1]) / n} for k, c in correct.items()}


def knn_table(results: dict[int, dict[str, float]]) -> str:
    lines = ["| k | top-1 (%) | top-5 (%) |", "|---|---|---|"]
    lines += [f"| {k} | {r['top1']:.2f} | {r['top5']:.2f} |" for k, r in sorted(results.items())]
    return "\n".join(lines)


def best_top1(results: dict[int, dict[str, float]], prefer: Iterable[int] = (20,)) -> float:
    for k in prefer:
        if k in results:
            return results[k]["top1"]
    return max(r["top1"] for r in results.values())
