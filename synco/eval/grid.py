"""The learning-rate grid of the linear probe: G heads trained in one pass, and the one to report.

Every batch goes through the backbone once and its features feed all heads, stacked into one ``[G*C, D]``
matrix (one matmul); each head is its own SGD parameter group with its own learning rate, so head ``g``
follows exactly the trajectory it would follow if trained alone on the same batches. Nothing here needs
a backbone: the heads work on features.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.optim import create_scheduler
from .probe import head_metrics
from .results import markdown_table


class HeadRecipe(Protocol):
    """What the trainer reads of a recipe; :class:`synco.eval.linear.LinearHParams` is one."""

    epochs: int
    warmup_epochs: int
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    bn: bool  # a parameter-free BatchNorm on the features


class GridLinear(nn.Module):
    """G linear heads over the same features, computed as one ``[G*C, D]`` matmul -> ``[N, G, C]``.

    Every head starts from the same weights (normal std 0.01, zero bias, drawn from ``seed``), so
    head g of a grid equals a head trained alone with the same seed. The optional parameter-free
    BatchNorm is shared: its statistics depend on the features only, so one copy serves every head.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, bn: bool = False, seed: int = 0,
                 init_std: float = 0.01):
        super().__init__()
        self.dim, self.num_classes, self.num_heads = dim, num_classes, num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False) if bn else None
        w0 = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * init_std
        self.weights = nn.ParameterList([nn.Parameter(w0.clone()) for _ in range(num_heads)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads)])

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            f = self.bn(f)
        w = torch.cat(list(self.weights)) if self.num_heads > 1 else self.weights[0]
        b = torch.cat(list(self.biases)) if self.num_heads > 1 else self.biases[0]
        return F.linear(f, w, b).view(f.shape[0], self.num_heads, self.num_classes)

    def head_state(self, g: int) -> dict:
        return {"weight": self.weights[g].detach().clone(), "bias": self.biases[g].detach().clone(),
                "bn_mean": self.bn.running_mean.clone() if self.bn is not None else None,
                "bn_var": self.bn.running_var.clone() if self.bn is not None else None}


class GridTrainer:
    """Trains a :class:`GridLinear` (one SGD parameter group per head) with timm's warm-up + cosine."""

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], hp: HeadRecipe, steps_per_epoch: int,
                 device: torch.device | str = "cpu", multilabel: bool = False, seed: int = 0):
        self.lrs, self.hp, self.multilabel = [float(v) for v in lrs], hp, multilabel
        self.device = torch.device(device)
        self.model = GridLinear(dim, num_classes, len(self.lrs), bn=hp.bn, seed=seed).to(self.device)
        groups = [{"params": [w, b], "lr": lr} for w, b, lr in zip(self.model.weights, self.model.biases, self.lrs)]
        self.optimizer = torch.optim.SGD(groups, lr=self.lrs[0], momentum=hp.momentum, nesterov=hp.nesterov,
                                         weight_decay=hp.weight_decay)
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = hp.epochs * self.steps_per_epoch
        self.scheduler = create_scheduler(self.optimizer, self.total_steps, hp.warmup_epochs * self.steps_per_epoch)
        self.step_count = 0
        self._loss_sum = torch.zeros(len(self.lrs), device=self.device)
        self._loss_n = 0

    def step(self, f: torch.Tensor, y: torch.Tensor) -> None:
        """One SGD step of every head on features ``f`` [N, D] and labels ``y``; the loss is the sum over
        heads of each head's mean loss, so head g receives exactly the gradient of its own loss."""
        self.model.train()
        self.scheduler.step_update(num_updates=self.step_count)
        logits = self.model(f.to(self.device, torch.float32))
        n, g, c = logits.shape
        y = y.to(self.device)
        if self.multilabel:
            per = F.binary_cross_entropy_with_logits(logits, y.float()[:, None, :].expand(n, g, c),
                                                     reduction="none").mean(dim=2)  # [N, G]
        else:
            per = F.cross_entropy(logits.reshape(n * g, c), y.long().repeat_interleave(g), reduction="none",
                                  label_smoothing=self.hp.label_smoothing).view(n, g)
        per_head = per.mean(0)
        self.optimizer.zero_grad(set_to_none=True)
        per_head.sum().backward()
        self.optimizer.step()
        self.step_count += 1
        self._loss_sum += per_head.detach()
        self._loss_n += 1

    def pop_train_loss(self) -> list[float]:
        out = (self._loss_sum / max(self._loss_n, 1)).tolist()
        self._loss_sum.zero_()
        self._loss_n = 0
        return out

    @torch.no_grad()
    def evaluate(self, f: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> dict[str, list]:
        self.model.eval()
        logits = torch.cat([self.model(f[i:i + chunk].to(self.device, torch.float32)).float()
                            for i in range(0, f.shape[0], chunk)])
        return head_metrics(logits, y.to(self.device), self.multilabel)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])


# ---------------------------------------------------------------------------------------------
# Selection and summary


def selection_key(metrics: dict, metric: str, g: int, epoch: int) -> tuple:
    """What selection maximises for head ``g``: its ``metric``, then a lower loss, then the later epoch."""
    return (metrics[metric][g], -metrics["loss"][g], epoch)


def select_best(history: list[dict], metric: str = "top1", use_heldout: bool = True) -> tuple[int, int]:
    """(head index, epoch) of the result to report.

    With a held-out split: the (head, epoch) with the best held-out ``metric`` (ties: lower held-out
    loss, then the later epoch). Without: the head with the best test ``metric`` at the last evaluated
    epoch, at that epoch.
    """
    if not history:
        raise ValueError("no evaluation in the history")
    if use_heldout:
        best = max((selection_key(h["heldout"], metric, g, h["epoch"]), g, h["epoch"])
                    for h in history for g in range(len(h["heldout"][metric])))
        return best[1], best[2]
    last = history[-1]
    g = max(range(len(last["test"][metric])), key=lambda i: selection_key(last["test"], metric, i, 0))
    return g, last["epoch"]


def summarize(history: list[dict], base_lrs: Sequence[float], lrs: Sequence[float], g: int, epoch: int,
              metric: str, use_heldout: bool, multilabel: bool) -> dict:
    """``best`` (head g at the selected epoch), ``last`` (head g at the last epoch), the headline
    ``metric``/``top5`` (= best) and one ``grid`` row per head (each at its own best held-out epoch)."""
    at = {h["epoch"]: h for h in history}
    last = history[-1]

    def numbers(entry: dict, i: int) -> dict:
        d = {metric: entry["test"][metric][i]}
        if not multilabel:
            d["top5"] = entry["test"]["top5"][i]
        if use_heldout:
            d["heldout_" + metric] = entry["heldout"][metric][i]
        return d

    grid = []
    for i, (v, lr) in enumerate(zip(base_lrs, lrs)):
        ei = (max(history, key=lambda h: selection_key(h["heldout"], metric, i, h["epoch"]))["epoch"]
              if use_heldout else last["epoch"])
        grid.append({"base_lr": float(v), "lr": float(lr), "epoch": ei, **numbers(at[ei], i),
                     "last_" + metric: last["test"][metric][i],
                     "max_test_" + metric: max(h["test"][metric][i] for h in history),
                     "final_train_loss": last["train_loss"][i]})
    best = {"head": g, "base_lr": float(base_lrs[g]), "lr": float(lrs[g]), "epoch": epoch, **numbers(at[epoch], g)}
    last_row = {"head": g, "base_lr": float(base_lrs[g]), "lr": float(lrs[g]), "epoch": last["epoch"],
                **numbers(last, g)}
    out = {"best": best, "last": last_row, metric: best[metric], "grid": grid}
    if not multilabel:
        out["top5"] = best["top5"]
    return out


def grid_table(result: dict) -> str:
    metric = result["metric"]
    rows = []
    for i, r in enumerate(result["grid"]):
        row = {"": "*" if i == result["best"]["head"] else "",
               "base lr": f"{r['base_lr']:g}", "lr": f"{r['lr']:.4g}", "epoch": r["epoch"]}
        if "heldout_" + metric in r:
            row[f"held-out {metric}"] = r["heldout_" + metric]
        row[f"test {metric}"] = r[metric]
        if "top5" in r:
            row["test top5"] = r["top5"]
        row[f"last-epoch {metric}"] = r["last_" + metric]
        rows.append(row)
    return markdown_table(rows, list(rows[0].keys()))
