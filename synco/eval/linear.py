"""`synco eval linear`: linear probing of a frozen backbone with a one-pass learning-rate grid.

Protocol (SynCo-v2 supplementary 7.5, SynBY 7.2): the backbone stays in eval mode (no BatchNorm
statistics update, drop path off) and receives no gradient; features are timm's pooled output
([CLS] token for DeiT, global average pool for Swin). SGD with momentum 0.9 (Nesterov optional),
weight decay 0, label smoothing 0.1, ``epochs`` epochs with ``warmup_epochs`` of linear warm-up then
cosine (timm's CosineLRScheduler, per iteration), RandomResizedCrop(0.08-1) + flip for training,
resize + centre crop for testing.

The learning-rate grid {0.1, 0.5, 0.75, 1.0, 1.25, 1.5} is trained in ONE pass: every batch goes
through the backbone once and the features feed all heads, stacked into one ``[G*C, D]`` matrix
(one matmul); each head is its own SGD parameter group with its own learning rate, so head ``g``
follows exactly the trajectory it would follow if trained alone on the same batches.

Learning rates are "scaled linearly according to batch size" (SynBY 7.2): the head trained with grid
value ``v`` uses ``v * batch_size / lr_batch_ref`` (``lr_batch_ref=256``, the usual reference;
``lr_batch_ref=0`` uses the grid values as given). ``batch_size`` is the total batch over all processes.

Selection: a seeded, stratified ``val_fraction`` of the training set is held out (evaluated with
the test transform) and the (head, epoch) with the best held-out top-1 (ties: lower held-out loss,
then the later epoch) is the reported result; its weights are written to ``linear_head.pt``
(:func:`synco.eval.head.save_head`). With ``val_fraction=0`` the head is chosen by test accuracy
at the last epoch and the result says ``selected_on: test``. The JSON also carries the selected
head's last-epoch numbers and every head's numbers.

``cache_features=true`` extracts the training features once with the test transform and trains the
heads on them: no augmentation, hence much faster (minutes instead of hours on ImageNet) but not the
paper's protocol, which re-augments every epoch; the result records which mode ran.

A killed run resumes at the last finished epoch from ``<out>/linear_ckpt.pt`` (written atomically
after every epoch); each epoch's batch order and augmentation draw from a seed of (seed, epoch,
rank), so a resumed run ends with the same heads as an uninterrupted one.

Under torchrun every process augments and encodes its share of each global batch; the features are
gathered so that every process applies the same update to its copy of the (small) heads. Rank 0 writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..data.transforms import train_classification_transform
from ..engine import dist as D
from ..engine.checkpoint import atomic_save
from ..engine.checkpoint import load as load_ckpt
from ..engine.optim import build_scheduler
from ..errors import SyncoError
from .common import EvalOptions, eval_datasets, eval_image_size, load_eval_backbone, resolve_device
from .head import LinearHead, save_head
from .features import predict
from .results import markdown_table, save_result

PAPER_LRS = [0.1, 0.5, 0.75, 1.0, 1.25, 1.5]
# Options that change nothing in the numbers: a resumed run may differ in them.
RESUME_FREE = {"device", "num_workers", "resume", "eval_every"}


@dataclass
class LinearHParams:
    """The linear-probe recipe (also used per dataset by ``synco eval transfer``)."""

    epochs: int = 100
    warmup_epochs: int = 5
    lrs: list = field(default_factory=lambda: list(PAPER_LRS))
    lr_batch_ref: int = 256  # lr = grid value x batch_size / lr_batch_ref; 0 = grid values as given
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    bn: bool = False  # parameter-free BatchNorm on the features before the linear layer
    val_fraction: float = 0.1  # held-out share of train used to select the head (0 = select on test)
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    cache_features: bool = False  # train on features extracted once without augmentation (fast, not the paper's)
    eval_every: int = 1  # evaluate every head on held-out and test every N epochs (and at the end)
    resume: bool = True  # continue from <out>/linear_ckpt.pt when it exists


@dataclass
class LinearOptions(LinearHParams, EvalOptions):
    pass


def check_hparams(h, prefix: str = "") -> None:
    def bad(key: str, msg: str) -> None:
        raise SyncoError(f"option '{prefix}{key}': {msg}")

    if h.epochs < 1:
        bad("epochs", "must be >= 1.")
    if not 0 <= h.warmup_epochs <= h.epochs:
        bad("warmup_epochs", f"must be in [0, epochs={h.epochs}].")
    if hasattr(h, "lrs"):
        if not h.lrs or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in h.lrs):
            bad("lrs", f"must be a non-empty list of positive numbers, got {h.lrs!r}.")
        if not 0 <= h.val_fraction < 1:
            bad("val_fraction", "must be in [0, 1).")
    if h.lr_batch_ref < 0:
        bad("lr_batch_ref", "must be >= 0 (0 = no batch-size scaling).")
    if not 0 <= h.momentum < 1:
        bad("momentum", "must be in [0, 1).")
    if h.nesterov and h.momentum == 0:
        bad("nesterov", "Nesterov momentum needs momentum > 0.")
    if h.weight_decay < 0:
        bad("weight_decay", "must be >= 0.")
    if not 0 <= h.label_smoothing < 1:
        bad("label_smoothing", "must be in [0, 1).")
    if len(h.crop_scale) != 2 or not 0 < h.crop_scale[0] <= h.crop_scale[1] <= 1:
        bad("crop_scale", "must be [min, max] with 0 < min <= max <= 1.")
    if h.eval_every < 1:
        bad("eval_every", "must be >= 1.")


def check_eval_options(o: EvalOptions) -> None:
    if o.batch_size < 1:
        raise SyncoError("option 'batch_size': must be >= 1.")
    if o.batch_size < D.world_size():
        raise SyncoError(f"option 'batch_size': the total batch {o.batch_size} is smaller than the "
                         f"{D.world_size()} processes; raise batch_size.")
    if o.num_workers < 0:
        raise SyncoError("option 'num_workers': must be >= 0.")


def scaled_lr(value: float, batch_size: int, ref: int) -> float:
    return float(value) * batch_size / ref if ref else float(value)


# ---------------------------------------------------------------------------------------------
# Heads and their trainer (work on features: usable without any backbone)


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


def head_from_state(state: dict) -> LinearHead:
    num_classes, dim = state["weight"].shape
    head = LinearHead(dim, num_classes, bn=state.get("bn_mean") is not None)
    with torch.no_grad():
        head.linear.weight.copy_(state["weight"])
        head.linear.bias.copy_(state["bias"])
        if head.bn is not None:
            head.bn.running_mean.copy_(state["bn_mean"])
            head.bn.running_var.copy_(state["bn_var"])
    return head.eval()


def multilabel_map(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean average precision (%) over labels (torchmetrics, macro), as for PASCAL VOC 2007; labels
    without a positive sample (their AP is undefined) are left out of the mean."""
    from torchmetrics.functional.classification import multilabel_average_precision

    keep = targets.sum(0) > 0
    if not bool(keep.any()):
        return float("nan")
    return 100.0 * float(multilabel_average_precision(logits.float()[:, keep], targets.int()[:, keep],
                                                      num_labels=int(keep.sum()), average="macro"))


@torch.no_grad()
def head_metrics(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool = False) -> dict[str, list]:
    """Per head metrics of logits ``[N, G, C]``: top1/top5/loss (%; loss is plain CE), or map/loss."""
    n, g, c = logits.shape
    if multilabel:
        t = targets.float()
        loss = F.binary_cross_entropy_with_logits(logits, t[:, None, :].expand(n, g, c), reduction="none")
        return {"map": [multilabel_map(logits[:, i], t) for i in range(g)],
                "loss": loss.mean(dim=(0, 2)).tolist()}
    y = targets.long()
    top = logits.topk(min(5, c), dim=2).indices  # [N, G, k]
    hit = top == y[:, None, None]
    loss = F.cross_entropy(logits.reshape(n * g, c), y.repeat_interleave(g), reduction="none").view(n, g)
    return {"top1": (100.0 * hit[:, :, 0].float().mean(0)).tolist(),
            "top5": (100.0 * hit.any(dim=2).float().mean(0)).tolist(),
            "loss": loss.mean(0).tolist()}


class GridTrainer:
    """Trains a :class:`GridLinear` (one SGD parameter group per head) with timm's warm-up + cosine."""

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], hp: LinearHParams, steps_per_epoch: int,
                 device: torch.device | str = "cpu", multilabel: bool = False, seed: int = 0):
        self.lrs, self.hp, self.multilabel = [float(v) for v in lrs], hp, multilabel
        self.device = torch.device(device)
        self.model = GridLinear(dim, num_classes, len(self.lrs), bn=hp.bn, seed=seed).to(self.device)
        groups = [{"params": [w, b], "lr": lr} for w, b, lr in zip(self.model.weights, self.model.biases, self.lrs)]
        self.optimizer = torch.optim.SGD(groups, lr=self.lrs[0], momentum=hp.momentum, nesterov=hp.nesterov,
                                         weight_decay=hp.weight_decay)
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = hp.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, hp.warmup_epochs * self.steps_per_epoch)
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
# Selection


def _key(metrics: dict, metric: str, g: int, epoch: int) -> tuple:
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
        best = max(((_key(h["heldout"], metric, g, h["epoch"]), g, h["epoch"])
                    for h in history for g in range(len(h["heldout"][metric]))))
        return best[1], best[2]
    last = history[-1]
    g = max(range(len(last["test"][metric])), key=lambda i: _key(last["test"], metric, i, 0))
    return g, last["epoch"]


# ---------------------------------------------------------------------------------------------
# Data helpers


@torch.no_grad()
def dataset_targets(dataset) -> Optional[list]:
    t = getattr(dataset, "targets", None)
    return list(t) if t is not None else None


def heldout_split(n: int, fraction: float, seed: int, targets: Optional[list] = None) -> tuple[list, list]:
    """(train indices, held-out indices): a seeded split, stratified by class when possible."""
    if fraction <= 0:
        return list(range(n)), []
    if n < 2:
        raise SyncoError(f"val_fraction={fraction} needs at least 2 training images; use val_fraction=0.")
    import numpy as np
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    strat = None
    if targets is not None and len(targets) == n and n and isinstance(targets[0], int):
        strat = np.asarray(targets)  # single-label classes; multi-hot targets are split at random
    try:
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    except ValueError:  # a class too small to stratify, or fewer held-out samples than classes
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed)
    if len(tr) == 0 or len(va) == 0:
        raise SyncoError(f"val_fraction={fraction} of {n} training images leaves an empty split; "
                         "change val_fraction (0 selects on the test set).")
    return sorted(int(i) for i in tr), sorted(int(i) for i in va)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 17) % 2**31


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The global batches of one epoch (positions in the training subset): a seeded permutation cut into
    full batches (the remainder is dropped; a set smaller than one batch is one batch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    if n <= batch_size:
        return [perm]
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


@dataclass
class ProbeData:
    """What a probe needs: the training images twice (train and test transform: same samples, same
    order), the test images, the class names and whether targets are multi-hot (VOC)."""

    train_aug: Dataset
    train_eval: Dataset
    test: Dataset
    classes: list
    targets: Optional[list] = None
    multilabel: bool = False
    name: str = ""


def fingerprint(opts, extra: dict) -> dict:
    d = {k: v for k, v in asdict(opts).items() if k not in RESUME_FREE}
    return json.loads(json.dumps({**d, **extra}, default=str, sort_keys=True))


def check_resumable(saved: dict, current: dict, path: Path) -> None:
    if saved == current:
        return
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    diffs = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys[:5])
    raise SyncoError(f"'{path}' belongs to a run with other settings ({diffs}). Use the same settings to resume, "
                     "resume=false to start over, or another --out.")


def _epoch_done(epoch: int) -> None:
    """Called after each finished (and checkpointed) epoch; tests patch it to simulate a kill."""


# ---------------------------------------------------------------------------------------------
# The probe


def linear_probe(backbone: nn.Module, meta: dict, data: ProbeData, out: Path, hp: LinearHParams, *,
                 batch_size: int, num_workers: int, seed: int, device: torch.device, image_size: int,
                 checkpoint: str, progress: bool = True, ckpt_name: str = "linear_ckpt.pt",
                 head_name: Optional[str] = "linear_head.pt", fp_extra: Optional[dict] = None) -> dict:
    """Train the LR grid on ``data`` and return the result dict (written by the caller)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_hparams(hp)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    metric = "map" if data.multilabel else "top1"
    n_all = len(data.train_aug)
    if len(data.train_eval) != n_all:
        raise SyncoError("internal: the train split differs between its two transforms.")
    train_idx, val_idx = heldout_split(n_all, hp.val_fraction, seed, data.targets)
    use_heldout = bool(val_idx)
    lrs = [scaled_lr(v, batch_size, hp.lr_batch_ref) for v in hp.lrs]
    steps = steps_per_epoch(len(train_idx), batch_size)
    dim = int(meta.get("num_features") or backbone.num_features)
    trainer = GridTrainer(dim, len(data.classes), lrs, hp, steps, device, data.multilabel, seed=seed)

    ckpt_path = out / ckpt_name
    fp = fingerprint(hp, {**(fp_extra or {}), "checkpoint": checkpoint, "batch_size": batch_size, "seed": seed,
                          "n_train": n_all, "image_size": image_size})
    start_epoch, history, snapshots = 0, [], {}
    if ckpt_path.exists() and hp.resume:
        state = load_ckpt(ckpt_path)
        check_resumable(state.get("fingerprint", {}), fp, ckpt_path)
        trainer.load_state_dict(state["trainer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        snapshots = {int(k): v for k, v in state["snapshots"].items()}

    def encode(x: torch.Tensor) -> torch.Tensor:
        return backbone(x)

    if start_epoch < hp.epochs:
        # Held-out and test features never change (frozen backbone, fixed transform): extract them once.
        eval_feats = {}
        if use_heldout:
            eval_feats["heldout"] = predict(encode, Subset(data.train_eval, val_idx), batch_size, num_workers,
                                            device, "held-out features", progress)
        eval_feats["test"] = predict(encode, data.test, batch_size, num_workers, device, "test features", progress)
        cached = None
        if hp.cache_features:
            cached = predict(encode, Subset(data.train_eval, train_idx), batch_size, num_workers, device,
                             "train features", progress)
        rank, world = D.rank(), D.world_size()
        bar = tqdm(total=hp.epochs, initial=start_epoch, desc=f"linear {data.name}".strip(), unit="epoch",
                   disable=not progress or not D.is_main())
        for epoch in range(start_epoch, hp.epochs):
            batches = epoch_batches(len(train_idx), batch_size, seed, epoch)
            if cached is not None:
                for b in tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress or not D.is_main()):
                    b = b.to(cached[0].device)
                    trainer.step(cached[0][b], cached[1][b])
            else:
                aug_seed = epoch_seed(seed, epoch, rank + 1)
                torch.manual_seed(aug_seed)  # augmentation in the main process (num_workers=0)
                loader = DataLoader(Subset(data.train_aug, train_idx),
                                    batch_sampler=[b[rank::world].tolist() for b in batches],
                                    num_workers=num_workers, pin_memory=device.type == "cuda",
                                    generator=torch.Generator().manual_seed(aug_seed))
                bf16 = device.type == "cuda"
                for x, y in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False,
                                 disable=not progress or not D.is_main()):
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        f = backbone(x.to(device, non_blocking=True))
                    f, y = f.float(), torch.as_tensor(y).to(device)
                    if world > 1:
                        f, y = D.all_gather_varsize(f), D.all_gather_varsize(y)
                    trainer.step(f, y)
            entry = {"epoch": epoch + 1, "train_loss": trainer.pop_train_loss()}
            if (epoch + 1) % hp.eval_every == 0 or epoch + 1 == hp.epochs:
                for split, (f, y) in eval_feats.items():
                    entry[split] = trainer.evaluate(f, y)
                history.append(entry)
                for g in range(len(lrs)):
                    split = "heldout" if use_heldout else "test"
                    key = list(_key(entry[split], metric, g, entry["epoch"])) if use_heldout else [entry["epoch"]]
                    if g not in snapshots or key > snapshots[g]["key"]:
                        snapshots[g] = {"key": key, **trainer.model.head_state(g)}
            if D.is_main():
                out.mkdir(parents=True, exist_ok=True)
                atomic_save({"version": 1, "fingerprint": fp, "epoch": epoch + 1, "trainer": trainer.state_dict(),
                             "history": history, "snapshots": snapshots}, ckpt_path)
            bar.update(1)
            if history and history[-1]["epoch"] == epoch + 1:
                last = history[-1]["heldout" if use_heldout else "test"][metric]
                bar.set_postfix_str(f"best {'held-out' if use_heldout else 'test'} {metric} {max(last):.1f}")
            _epoch_done(epoch + 1)
        bar.close()

    g, epoch = select_best(history, metric, use_heldout)
    result = summarize(history, hp.lrs, lrs, g, epoch, metric, use_heldout, data.multilabel)
    result = {
        "protocol": "linear", "checkpoint": checkpoint, "backbone": meta["backbone"], "backbone_meta": meta,
        "dataset": data.name, "num_classes": len(data.classes), "multilabel": data.multilabel, "metric": metric,
        "n_train": len(train_idx), "n_heldout": len(val_idx), "n_test": len(data.test),
        "epochs": hp.epochs, "batch_size": batch_size, "lr_scale": lrs[0] / float(hp.lrs[0]),
        "mode": "cached features (no augmentation)" if hp.cache_features else "augmented every epoch",
        "selected_on": "heldout" if use_heldout else "test", **result,
        "history": history, "seconds": time.perf_counter() - t0,
    }
    if head_name and D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_head(head_from_state(snapshots[g]), out / head_name, data.classes, meta, image_size)
    return result


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
        ei = (max(history, key=lambda h: _key(h["heldout"], metric, i, h["epoch"]))["epoch"] if use_heldout
              else last["epoch"])
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


def report_columns(result: dict, prefix: str = "Linear") -> dict:
    metric = result["metric"]
    cols = {f"{prefix} {'top-1' if metric == 'top1' else 'mAP'}": result[metric]}
    if "top5" in result:
        cols[f"{prefix} top-5"] = result["top5"]
    return cols


# ---------------------------------------------------------------------------------------------
# `synco eval linear`


def probe_data(opts: EvalOptions, size: int, crop_scale) -> ProbeData:
    train_tf = train_classification_transform(size, crop_scale=tuple(crop_scale))
    train_aug, test = eval_datasets(opts, size, train_transform=train_tf)
    train_eval, _ = eval_datasets(opts, size)
    return ProbeData(train_aug, train_eval, test, list(test.classes), dataset_targets(train_eval), False,
                     opts.dataset)


def run_linear(checkpoint: str, out: Path, opts: LinearOptions, progress: bool = True) -> dict:
    check_hparams(opts)
    check_eval_options(opts)
    device = resolve_device(opts.device)
    backbone, meta = load_eval_backbone(checkpoint, opts, device)
    size = eval_image_size(opts, backbone)
    data = probe_data(opts, size, opts.crop_scale)
    result = linear_probe(backbone, meta, data, Path(out), opts, batch_size=opts.batch_size,
                          num_workers=opts.num_workers, seed=opts.seed, device=device, image_size=size,
                          checkpoint=checkpoint, progress=progress,
                          fp_extra={"dataset": opts.dataset, "root": opts.root, "class_list": opts.class_list})
    result["options"] = asdict(opts)
    result["report"] = report_columns(result)
    if D.is_main():
        save_result(out, "linear", result)
        print(grid_table(result))
        b = result["best"]
        print(f"linear: top-1 {b['top1']:.2f}  top-5 {b['top5']:.2f}  (base lr {b['base_lr']:g}, epoch {b['epoch']}, "
              f"selected on {result['selected_on']}; last epoch {result['last']['top1']:.2f})")
    return result
