"""Out-of-distribution detection scores: FPR at 95% TPR (ImageNet-O, Table 13) and AUROC.

Convention (Hendrycks et al.; OpenOOD): in-distribution samples are the positive class and a higher
score means "more in-distribution". The threshold is the highest one that keeps at least 95% of the
in-distribution samples (TPR >= 0.95); FPR95 is the fraction of out-of-distribution samples scoring at
or above it. Lower is better; a detector that cannot separate the two sets scores about 95%.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SyncoError


def max_softmax_probability(logits: torch.Tensor) -> torch.Tensor:
    """The MSP baseline score (Hendrycks & Gimpel 2017): max_c softmax(logits)_c, in float32."""
    return torch.softmax(logits.float(), dim=1).max(dim=1).values


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise SyncoError("an OOD score set is empty: FPR95 needs in-distribution and OOD samples.")
    if not np.all(np.isfinite(x)):
        raise SyncoError("OOD scores contain NaN or infinite values.")
    return x


def _roc(id_scores, ood_scores):
    from sklearn.metrics import roc_curve

    s_in, s_out = _as_numpy(id_scores), _as_numpy(ood_scores)
    labels = np.concatenate([np.ones_like(s_in), np.zeros_like(s_out)])
    scores = np.concatenate([s_in, s_out])
    # drop_intermediate=False keeps every threshold, so the first point with TPR >= 0.95 is exact.
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr, thresholds, labels, scores


def fpr_at_tpr(id_scores, ood_scores, tpr_level: float = 0.95) -> float:
    """FPR (%) at the first ROC point whose TPR reaches ``tpr_level`` (in-distribution = positive)."""
    if not 0.0 < tpr_level <= 1.0:
        raise SyncoError(f"tpr_level must be in (0, 1], got {tpr_level}.")
    fpr, tpr, _, _, _ = _roc(id_scores, ood_scores)
    return 100.0 * float(fpr[np.argmax(tpr >= tpr_level - 1e-12)])


def auroc(id_scores, ood_scores) -> float:
    from sklearn.metrics import roc_auc_score

    _, _, _, labels, scores = _roc(id_scores, ood_scores)
    return 100.0 * float(roc_auc_score(labels, scores))


def ood_metrics(id_scores, ood_scores) -> dict:
    """``{"fpr95": %, "auroc": %, "n_id": int, "n_ood": int}``."""
    return {"fpr95": fpr_at_tpr(id_scores, ood_scores, 0.95), "auroc": auroc(id_scores, ood_scores),
            "n_id": int(_as_numpy(id_scores).size), "n_ood": int(_as_numpy(ood_scores).size)}
