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

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..engine import dist
from ..errors import SyncoError
from ..io import atomic_save
from ..options import opt
from .common import EvalOptions, weights_digest
from .features import predict
from .grid import GridTrainer, grid_table, select_best, selection_key, summarize
from .head import head_from_state, save_head
from .probe import (
    ProbeData,
    SGDRecipe,
    augmented_loader,
    batch_scaled_lr,
    check_recipe,
    epoch_batches,
    epoch_draw_seed,
    fingerprint,
    resume_state,
    run_probe,
    steps_per_epoch,
)

PAPER_LRS = [0.1, 0.5, 0.75, 1.0, 1.25, 1.5]


@dataclass
class LinearHParams(SGDRecipe):
    """The linear-probe recipe (also used per dataset by ``synco eval transfer``): the paper's grid of learning rates,
    trained in one pass, the best head picked on a held-out share of train."""

    lrs: list[float] = opt(factory=lambda: list(PAPER_LRS), nonempty=True, gt=0)
    bn: bool = False  # parameter-free BatchNorm on the features before the linear layer
    # held-out share of train used to select the head (0 = select on test)
    val_fraction: float = opt(0.1, ge=0, lt=1)
    cache_features: bool = False  # train on features extracted once without augmentation (fast, not the paper's)


@dataclass
class LinearOptions(LinearHParams, EvalOptions):
    pass


def heldout_split(n: int, fraction: float, seed: int, targets: Optional[list] = None) -> tuple[list, list]:
    """(train indices, held-out indices): a seeded split, stratified by class when possible."""
    if fraction <= 0:
        return list(range(n)), []
    if n < 2:
        raise SyncoError(f"val_fraction={fraction} needs at least 2 training images; use val_fraction=0.")
    held = math.ceil(fraction * n)  # scikit-learn's rounding of a fractional test_size, checked before it raises
    if held >= n:
        largest = math.floor(1000 * (n - 1) / n) / 1000  # rounded down: rounded up it could hold out all again
        raise SyncoError(f"option 'val_fraction': {fraction} of {n} training images holds out {held} and leaves "
                         f"none to train the probe on. Use a smaller val_fraction (at most {largest:g} here), or 0 "
                         "to select the head on the test set.")
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




# ---------------------------------------------------------------------------------------------
# The probe


def linear_probe(backbone: nn.Module, meta: dict, data: ProbeData, out: Path, hp: LinearHParams, *,
                 batch_size: int, num_workers: int, seed: int, device: torch.device, image_size: int,
                 checkpoint: str, progress: bool = True, ckpt_name: str = "linear_ckpt.pt",
                 head_name: Optional[str] = "linear_head.pt", fp_extra: Optional[dict] = None,
                 on_epoch: Optional[Callable[[int], None]] = None) -> dict:
    """Train the LR grid on ``data`` and return the result dict (written by the caller). ``on_epoch(n)`` is
    called after epoch ``n`` is checkpointed (progress reporting; a kill raised there resumes exactly)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_recipe(hp)
    backbone.eval().requires_grad_(False)  # frozen: no BatchNorm statistics update, drop path off, no gradient
    metric = "map" if data.multilabel else "top1"
    train_idx, val_idx = _train_heldout_split(data, hp.val_fraction, seed)
    use_heldout = bool(val_idx)
    lrs = [batch_scaled_lr(v, batch_size, hp.lr_batch_ref) for v in hp.lrs]
    dim = int(meta.get("num_features") or backbone.num_features)
    trainer = GridTrainer(dim, len(data.classes), lrs, hp, steps_per_epoch(len(train_idx), batch_size), device,
                          data.multilabel, seed=seed)

    # -- resume: a killed run of the same fingerprint goes on after its last finished epoch
    ckpt_path = out / ckpt_name
    # Keyed by the weights' hash, not the checkpoint's path: a run that trained further is another backbone.
    fp = fingerprint(hp, {**(fp_extra or {}), "weights": weights_digest(backbone), "batch_size": batch_size,
                          "seed": seed, "n_train": len(data.train_aug), "image_size": image_size})
    state = _GridState(trainer, ckpt_path, fp)
    state.resume(hp.resume)

    # -- the epochs: every head on the same batches; evaluate, keep each head's best, checkpoint
    if state.epoch < hp.epochs:
        eval_feats, cached = _fixed_features(backbone, data, train_idx, val_idx, hp.cache_features, batch_size,
                                             num_workers, device, progress)
        bar = tqdm(total=hp.epochs, initial=state.epoch, desc=f"linear {data.name}".strip(), unit="epoch",
                   disable=not progress or not dist.is_main())
        for epoch in range(state.epoch, hp.epochs):
            batches = epoch_batches(len(train_idx), batch_size, seed, epoch)
            bar_kw = dict(desc=f"epoch {epoch + 1}", leave=False, disable=not progress or not dist.is_main())
            _train_epoch(trainer, backbone, cached, Subset(data.train_aug, train_idx), batches,
                         epoch_draw_seed(seed, epoch, dist.rank() + 1), num_workers, device, bar_kw)
            entry = {"epoch": epoch + 1, "train_loss": trainer.pop_train_loss()}
            if (epoch + 1) % hp.eval_every == 0 or epoch + 1 == hp.epochs:
                state.record(entry, eval_feats, metric, use_heldout)
            state.epoch = epoch + 1
            if dist.is_main():
                state.save(out)
            _show_progress(bar, state.history, epoch + 1, metric, use_heldout)
            if on_epoch is not None:  # after the epoch's checkpoint: a kill here loses nothing
                on_epoch(epoch + 1)
        bar.close()

    # -- the selected (head, epoch)
    g, epoch = select_best(state.history, metric, use_heldout)
    result = _probe_result(state.history, hp, lrs, g, epoch, metric, use_heldout, data, meta, checkpoint,
                           len(train_idx), len(val_idx), batch_size, t0)
    _check_finite_head(state.snapshots[g], hp.lrs[g])
    if head_name and dist.is_main():
        _save_selected_head(state.snapshots[g], out / head_name, data, meta, image_size, fp["weights"])
    return result


def _train_heldout_split(data: ProbeData, fraction: float, seed: int) -> tuple[list, list]:
    n_all = len(data.train_aug)
    if len(data.train_eval) != n_all:
        raise SyncoError("internal: the train split differs between its two transforms.")
    return heldout_split(n_all, fraction, seed, data.targets)


class _GridState:
    """What a killed probe resumes from: the heads (their optimizer and schedule), the epochs done, the evaluated
    epochs' numbers and each head's best weights so far."""

    def __init__(self, trainer: GridTrainer, path: Path, fp: dict):
        self.trainer, self.path, self.fp = trainer, path, fp
        self.epoch, self.history, self.snapshots = 0, [], {}

    def resume(self, resume: bool) -> None:
        state = resume_state(self.path, self.fp, resume, {"trainer": dict, "epoch": int, "history": list,
                                                          "snapshots": dict})
        if state is not None:
            self.trainer.load_state_dict(state["trainer"])
            self.epoch, self.history = int(state["epoch"]), list(state["history"])
            self.snapshots = {int(k): v for k, v in state["snapshots"].items()}

    def record(self, entry: dict, eval_feats: dict, metric: str, use_heldout: bool) -> None:
        """Score every head on the fixed features, and keep each head's weights where its selection key beats
        its best so far (held-out numbers, or the latest epoch when selecting on test)."""
        for split, (f, y) in eval_feats.items():
            entry[split] = self.trainer.evaluate(f, y)
        self.history.append(entry)
        for g in range(len(self.trainer.lrs)):
            split = "heldout" if use_heldout else "test"
            key = (list(selection_key(entry[split], metric, g, entry["epoch"])) if use_heldout
                   else [entry["epoch"]])
            if g not in self.snapshots or key > self.snapshots[g]["key"]:
                self.snapshots[g] = {"key": key, **self.trainer.model.head_state(g)}

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_save({"version": 1, "fingerprint": self.fp, "epoch": self.epoch, "trainer": self.trainer.state_dict(),
                     "history": self.history, "snapshots": self.snapshots}, self.path)


def _fixed_features(backbone: nn.Module, data: ProbeData, train_idx: list, val_idx: list, cache: bool,
                    batch_size: int, num_workers: int, device: torch.device, progress: bool) -> tuple[dict, tuple]:
    """(held-out and test features, cached training features or None). The backbone is frozen and these use the
    test transform, so they never change between epochs: extracted once."""
    eval_feats = {}
    if val_idx:
        eval_feats["heldout"] = predict(backbone, Subset(data.train_eval, val_idx), batch_size, num_workers,
                                        device, "held-out features", progress)
    eval_feats["test"] = predict(backbone, data.test, batch_size, num_workers, device, "test features", progress)
    cached = None
    if cache:
        cached = predict(backbone, Subset(data.train_eval, train_idx), batch_size, num_workers, device,
                         "train features", progress)
    return eval_feats, cached


def _train_epoch(trainer: GridTrainer, backbone: nn.Module, cached: Optional[tuple], train: Subset, batches: list,
                 aug_seed: int, num_workers: int, device: torch.device, bar_kw: dict) -> None:
    """One epoch of every head: on the cached training features when there are (no augmentation), else on
    freshly augmented images, each process encoding its share of each global batch and stepping its copy of the
    heads on the gathered features."""
    if cached is not None:
        for b in tqdm(batches, **bar_kw):
            b = b.to(cached[0].device)
            trainer.step(cached[0][b], cached[1][b])
        return
    loader = augmented_loader(train, batches, aug_seed, num_workers, device)
    bf16 = device.type == "cuda"
    for x, y in tqdm(loader, **bar_kw):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = backbone(x.to(device, non_blocking=True))
        f, y = f.float(), torch.as_tensor(y).to(device)
        if dist.world_size() > 1:
            f, y = dist.all_gather_varsize(f), dist.all_gather_varsize(y)
        trainer.step(f, y)


def _show_progress(bar, history: list, epochs_done: int, metric: str, use_heldout: bool) -> None:
    bar.update(1)
    if history and history[-1]["epoch"] == epochs_done:
        last = history[-1]["heldout" if use_heldout else "test"][metric]
        bar.set_postfix_str(f"best {'held-out' if use_heldout else 'test'} {metric} {max(last):.1f}")


def _probe_result(history: list, hp: LinearHParams, lrs: list, g: int, epoch: int, metric: str, use_heldout: bool,
                  data: ProbeData, meta: dict, checkpoint: str, n_train: int, n_heldout: int, batch_size: int,
                  t0: float) -> dict:
    summary = summarize(history, hp.lrs, lrs, g, epoch, metric, use_heldout, data.multilabel)
    return {
        "protocol": "linear", "checkpoint": checkpoint, "backbone": meta["backbone"], "backbone_meta": meta,
        "dataset": data.name, "num_classes": len(data.classes), "multilabel": data.multilabel, "metric": metric,
        "n_train": n_train, "n_heldout": n_heldout, "n_test": len(data.test),
        "epochs": hp.epochs, "batch_size": batch_size, "lr_scale": lrs[0] / float(hp.lrs[0]),
        "mode": "cached features (no augmentation)" if hp.cache_features else "augmented every epoch",
        "selected_on": "heldout" if use_heldout else "test", **summary,
        "history": history, "seconds": time.perf_counter() - t0,
    }


def _save_selected_head(snapshot: dict, path: Path, data: ProbeData, meta: dict, image_size: int,
                        weights: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_head(head_from_state(snapshot), path, data.classes, meta, image_size, weights)


def _check_finite_head(snapshot: dict, base_lr: float) -> None:
    """The selected head is the one robustness and adversarial would score with: NaN or inf weights are refused."""
    chosen = [snapshot[k] for k in ("weight", "bias", "bn_mean", "bn_var") if snapshot.get(k) is not None]
    if not all(bool(torch.isfinite(t).all()) for t in chosen):
        raise SyncoError(f"the linear probe diverged: the selected head (base lr {base_lr}) holds NaN or inf "
                         "weights, so its numbers are meaningless. Use smaller lrs=; no head or result was written.")


# ---------------------------------------------------------------------------------------------
# `synco eval linear`


def run_linear(checkpoint: str, out: Path, opts: LinearOptions, progress: bool = True) -> dict:
    return run_probe(checkpoint, out, opts, linear_probe, "linear", "Linear", _summary, progress)


def _summary(result: dict) -> str:
    b = result["best"]
    return (grid_table(result) + f"\nlinear: top-1 {b['top1']:.2f}  top-5 {b['top5']:.2f}  (base lr {b['base_lr']:g}, "
            f"epoch {b['epoch']}, selected on {result['selected_on']}; last epoch {result['last']['top1']:.2f})")
