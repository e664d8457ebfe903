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

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..engine import dist as D
from ..errors import SyncoError
from ..io import atomic_save
from ..options import opt
from .common import EvalOptions, weights_digest
from .features import predict
from .grid import GridTrainer, grid_table, select_best, selection_key, summarize
from .head import head_from_state, save_head
from .probe import (
    ProbeData,
    batch_scaled_lr,
    check_recipe,
    epoch_batches,
    epoch_draw_seed,
    fingerprint,
    protocol_inputs,
    report_columns,
    resume_state,
    steps_per_epoch,
)
from .results import save_result

PAPER_LRS = [0.1, 0.5, 0.75, 1.0, 1.25, 1.5]


@dataclass
class LinearHParams:
    """The linear-probe recipe (also used per dataset by ``synco eval transfer``)."""

    epochs: int = opt(100, ge=1)
    warmup_epochs: int = opt(5, ge=0)
    lrs: list[float] = opt(factory=lambda: list(PAPER_LRS), nonempty=True, gt=0)
    # lr = grid value x batch_size / lr_batch_ref; 0 = grid values as given
    lr_batch_ref: int = opt(256, ge=0, why="0 = no batch-size scaling")
    momentum: float = opt(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = opt(0.0, ge=0)
    label_smoothing: float = opt(0.1, ge=0, lt=1)
    bn: bool = False  # parameter-free BatchNorm on the features before the linear layer
    # held-out share of train used to select the head (0 = select on test)
    val_fraction: float = opt(0.1, ge=0, lt=1)
    crop_scale: list[float] = opt(factory=lambda: [0.08, 1.0], length=2, gt=0, le=1, why="[min, max]")
    cache_features: bool = False  # train on features extracted once without augmentation (fast, not the paper's)
    eval_every: int = opt(1, ge=1)  # evaluate every head on held-out and test every N epochs (and at the end)
    resume: bool = True  # continue from <out>/linear_ckpt.pt when it exists


@dataclass
class LinearOptions(LinearHParams, EvalOptions):
    pass


def check_hparams(h, prefix: str = "") -> None:
    """The recipe's checks (each field's bounds are declared above; check_recipe relates them)."""
    check_recipe(h, prefix)


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
    lrs = [batch_scaled_lr(v, batch_size, hp.lr_batch_ref) for v in hp.lrs]
    steps = steps_per_epoch(len(train_idx), batch_size)
    dim = int(meta.get("num_features") or backbone.num_features)
    trainer = GridTrainer(dim, len(data.classes), lrs, hp, steps, device, data.multilabel, seed=seed)

    ckpt_path = out / ckpt_name
    # Keyed by the weights' hash, not the checkpoint's path: a run that trained further is another backbone.
    fp = fingerprint(hp, {**(fp_extra or {}), "weights": weights_digest(backbone), "batch_size": batch_size,
                          "seed": seed, "n_train": n_all, "image_size": image_size})
    start_epoch, history, snapshots = 0, [], {}
    state = resume_state(ckpt_path, fp, hp.resume, {"trainer": dict, "epoch": int, "history": list,
                                                    "snapshots": dict})
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        snapshots = {int(k): v for k, v in state["snapshots"].items()}

    if start_epoch < hp.epochs:
        # Held-out and test features never change (frozen backbone, fixed transform): extract them once.
        eval_feats = {}
        if use_heldout:
            eval_feats["heldout"] = predict(backbone, Subset(data.train_eval, val_idx), batch_size, num_workers,
                                            device, "held-out features", progress)
        eval_feats["test"] = predict(backbone, data.test, batch_size, num_workers, device, "test features", progress)
        cached = None
        if hp.cache_features:
            cached = predict(backbone, Subset(data.train_eval, train_idx), batch_size, num_workers, device,
                             "train features", progress)
        bar = tqdm(total=hp.epochs, initial=start_epoch, desc=f"linear {data.name}".strip(), unit="epoch",
                   disable=not progress or not D.is_main())
        for epoch in range(start_epoch, hp.epochs):
            batches = epoch_batches(len(train_idx), batch_size, seed, epoch)
            bar_kw = dict(desc=f"epoch {epoch + 1}", leave=False, disable=not progress or not D.is_main())
            if cached is not None:
                for b in tqdm(batches, **bar_kw):
                    b = b.to(cached[0].device)
                    trainer.step(cached[0][b], cached[1][b])
            else:
                _train_augmented_epoch(trainer, backbone, Subset(data.train_aug, train_idx), batches,
                                       epoch_draw_seed(seed, epoch, D.rank() + 1), num_workers, device, bar_kw)
            entry = {"epoch": epoch + 1, "train_loss": trainer.pop_train_loss()}
            if (epoch + 1) % hp.eval_every == 0 or epoch + 1 == hp.epochs:
                for split, (f, y) in eval_feats.items():
                    entry[split] = trainer.evaluate(f, y)
                history.append(entry)
                for g in range(len(lrs)):
                    split = "heldout" if use_heldout else "test"
                    key = (list(selection_key(entry[split], metric, g, entry["epoch"])) if use_heldout
                           else [entry["epoch"]])
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
            if on_epoch is not None:  # after the epoch's checkpoint: a kill here loses nothing
                on_epoch(epoch + 1)
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
    chosen = [snapshots[g][k] for k in ("weight", "bias", "bn_mean", "bn_var") if snapshots[g].get(k) is not None]
    if not all(bool(torch.isfinite(t).all()) for t in chosen):  # a head robustness/adversarial would score with
        raise SyncoError(f"the linear probe diverged: the selected head (base lr {hp.lrs[g]}) holds NaN or inf "
                         "weights, so its numbers are meaningless. Use smaller lrs=; no head or result was written.")
    if head_name and D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_head(head_from_state(snapshots[g]), out / head_name, data.classes, meta, image_size)
    return result


def _train_augmented_epoch(trainer: GridTrainer, backbone: nn.Module, train: Subset, batches: list,
                           aug_seed: int, num_workers: int, device: torch.device, bar_kw: dict) -> None:
    """One epoch on freshly augmented images: every process encodes its share of each global batch and
    every process steps its copy of the heads on the gathered features."""
    rank, world = D.rank(), D.world_size()
    torch.manual_seed(aug_seed)  # augmentation in the main process (num_workers=0)
    loader = DataLoader(train, batch_sampler=[b[rank::world].tolist() for b in batches],
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(aug_seed))
    bf16 = device.type == "cuda"
    for x, y in tqdm(loader, **bar_kw):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = backbone(x.to(device, non_blocking=True))
        f, y = f.float(), torch.as_tensor(y).to(device)
        if world > 1:
            f, y = D.all_gather_varsize(f), D.all_gather_varsize(y)
        trainer.step(f, y)


# ---------------------------------------------------------------------------------------------
# `synco eval linear`


def run_linear(checkpoint: str, out: Path, opts: LinearOptions, progress: bool = True) -> dict:
    check_hparams(opts)
    backbone, meta, data, kwargs = protocol_inputs(checkpoint, opts)
    result = linear_probe(backbone, meta, data, Path(out), opts, progress=progress, **kwargs)
    result["options"] = asdict(opts)
    result["report"] = report_columns(result, "Linear")
    if D.is_main():
        save_result(out, "linear", result)
        print(grid_table(result))
        b = result["best"]
        print(f"linear: top-1 {b['top1']:.2f}  top-5 {b['top5']:.2f}  (base lr {b['base_lr']:g}, epoch {b['epoch']}, "
              f"selected on {result['selected_on']}; last epoch {result['last']['top1']:.2f})")
    return result
