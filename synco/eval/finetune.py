"""`synco eval finetune`: end-to-end fine-tuning of a pretrained backbone (SynCo-v2 supplementary 7.6).

All weights are trained: SGD momentum 0.9, lr 1e-3, weight decay 1e-4 (timm's parameter groups:
norms, biases, position embedding and class token get none), ``epochs`` epochs with
``warmup_epochs`` of linear warm-up then cosine (timm's CosineLRScheduler, per iteration),
RandomResizedCrop(0.08-1) + flip, dropout 0.1 before the linear classifier, label smoothing 0.1,
gradient clipping at norm 1.0. As for the linear probe, the learning rate is scaled by
``batch_size / lr_batch_ref`` (256; 0 = as given), which leaves it at 1e-3 for the default batch 256.

The test set is evaluated every ``eval_every`` epochs; the result reports the last epoch (the
number to quote, no selection on test) and, for information, the best test epoch.

A killed run resumes from ``<out>/finetune_ckpt.pt`` (atomic, after every epoch) with the same
final weights as an uninterrupted run (seeded per-epoch batch order and augmentation). Under
torchrun the model is wrapped in DistributedDataParallel (SyncBatchNorm when it has BatchNorm) and
every process takes its share of each global batch of ``batch_size``; rank 0 writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..engine import dist
from ..engine.optim import create_scheduler
from ..errors import SyncoError
from ..io import atomic_save
from ..options import opt
from .common import EvalOptions, weights_digest
from .features import predict
from .probe import (
    ProbeData,
    SGDRecipe,
    augmented_loader,
    batch_scaled_lr,
    check_recipe,
    epoch_batches,
    epoch_draw_seed,
    fingerprint,
    head_metrics,
    resume_state,
    run_probe,
    steps_per_epoch,
)
from .results import markdown_table


@dataclass
class FinetuneHParams(SGDRecipe):
    """SynCo-v2's fine-tuning recipe (section 7.6): the whole backbone and a dropout + linear classifier."""

    warmup_epochs: int = opt(10, ge=0)
    lr: float = opt(1e-3, gt=0)
    weight_decay: float = opt(1e-4, ge=0)
    dropout: float = opt(0.1, ge=0, lt=1)  # before the classifier
    # max gradient norm (null = no clipping)
    clip_grad: Optional[float] = opt(1.0, gt=0, why="or null for no clipping")


@dataclass
class FinetuneOptions(FinetuneHParams, EvalOptions):
    pass


class FinetuneModel(nn.Module):
    """backbone -> dropout -> linear classifier (normal std 0.01, zero bias, drawn from ``seed``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        dim = int(backbone.num_features)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * 0.01)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))

    def no_weight_decay(self) -> set:
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in names}


def create_finetune_optimizer(model: nn.Module, hp: FinetuneHParams, lr: float) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="nesterov" if hp.nesterov else "momentum", lr=lr,
                               weight_decay=hp.weight_decay, momentum=hp.momentum)


def finetune(backbone: nn.Module, meta: dict, data: ProbeData, out: Path, hp: FinetuneHParams, *, batch_size: int,
             num_workers: int, seed: int, device: torch.device, image_size: int, checkpoint: str,
             progress: bool = True, ckpt_name: str = "finetune_ckpt.pt", fp_extra: Optional[dict] = None,
             on_epoch: Optional[Callable[[int], None]] = None) -> dict:
    """Fine-tune ``backbone`` + a new classifier on ``data``; returns the result dict (the caller writes it).
    ``on_epoch(n)`` is called after epoch ``n`` is checkpointed (progress reporting; a kill raised there resumes
    exactly)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_recipe(hp)
    n = len(data.train_aug)
    steps = steps_per_epoch(n, batch_size)
    lr = batch_scaled_lr(hp.lr, batch_size, hp.lr_batch_ref)
    weights = weights_digest(backbone)
    run = _FinetuneRun(backbone, data, hp, lr, steps, seed, device)

    # -- resume: a killed run of the same fingerprint goes on after its last finished epoch
    ckpt_path = out / ckpt_name
    # Keyed by the pretrained weights' hash (taken before any update), not the checkpoint's path.
    fp = fingerprint(hp, {**(fp_extra or {}), "weights": weights, "batch_size": batch_size, "seed": seed,
                          "n_train": n, "image_size": image_size})
    run.resume(ckpt_path, fp)
    run.distribute()
    metric = "map" if data.multilabel else "top1"

    # -- the epochs: train, evaluate on test every eval_every, checkpoint
    bar = tqdm(total=hp.epochs, initial=run.epoch, desc=f"finetune {data.name}".strip(), unit="epoch",
               disable=not progress or not dist.is_main())
    for epoch in range(run.epoch, hp.epochs):
        batches = epoch_batches(n, batch_size, seed, epoch)
        loader = augmented_loader(data.train_aug, batches, epoch_draw_seed(seed, epoch, dist.rank() + 1),
                                  num_workers, device)
        bar_kw = dict(desc=f"epoch {epoch + 1}", leave=False, disable=not progress or not dist.is_main())
        entry = {"epoch": epoch + 1, "train_loss": run.train_epoch(loader, bar_kw) / max(len(batches), 1),
                 "lr": run.optimizer.param_groups[0]["lr"]}
        _check_finite_loss(entry)  # before this epoch's checkpoint: the last good one stays
        if (epoch + 1) % hp.eval_every == 0 or epoch + 1 == hp.epochs:
            entry["test"] = run.test_metrics(data, batch_size, num_workers, progress)
            run.history.append(entry)
            bar.set_postfix_str(f"test {metric} {entry['test'][metric]:.1f}")
        run.epoch = epoch + 1
        if dist.is_main():
            run.save(ckpt_path, fp)
        bar.update(1)
        if on_epoch is not None:  # after the epoch's checkpoint: a kill here loses nothing
            on_epoch(epoch + 1)
    bar.close()
    return _finetune_result(run.history, metric, data, meta, checkpoint, n, hp, batch_size, lr, t0)


class _FinetuneRun:
    """One fine-tuning in memory: the model (every weight trained), its optimizer, schedule and loss, and where
    it stands (epochs done, optimizer steps, the evaluated epochs' numbers)."""

    def __init__(self, backbone: nn.Module, data: ProbeData, hp: FinetuneHParams, lr: float, steps: int, seed: int,
                 device: torch.device):
        backbone.requires_grad_(True)
        model = FinetuneModel(backbone, len(data.classes), hp.dropout, seed).to(device)
        if dist.world_size() > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = self.net = model  # net: what the batches go through (the model, or its DDP wrapper)
        self.optimizer = create_finetune_optimizer(model, hp, lr)
        self.scheduler = create_scheduler(self.optimizer, hp.epochs * steps, hp.warmup_epochs * steps)
        self.loss_fn = _loss_function(data.multilabel, hp.label_smoothing)
        self.hp, self.device = hp, device
        self.epoch, self.step, self.history = 0, 0, []

    def resume(self, path: Path, fp: dict) -> None:
        state = resume_state(path, fp, self.hp.resume, {"model": dict, "optimizer": dict, "epoch": int, "step": int,
                                                        "history": list})
        if state is not None:
            _check_finite_checkpoint(state, path)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch, self.step, self.history = int(state["epoch"]), int(state["step"]), list(state["history"])

    def distribute(self) -> None:
        """Under torchrun, DistributedDataParallel: after the resume, so that every process starts from the
        weights rank 0 broadcasts."""
        if dist.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def train_epoch(self, loader, bar_kw: dict) -> float:
        """One epoch of optimizer steps; the summed loss."""
        self.model.train()
        bf16 = self.device.type == "cuda"
        loss_sum = torch.zeros((), device=self.device)
        for x, y in tqdm(loader, **bar_kw):
            self.scheduler.step_update(num_updates=self.step)
            x, y = x.to(self.device, non_blocking=True), torch.as_tensor(y).to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = self.net(x)
            loss = self.loss_fn(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.hp.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.clip_grad)
            self.optimizer.step()
            self.step += 1
            loss_sum += loss.detach()
        return float(loss_sum)

    def test_metrics(self, data: ProbeData, batch_size: int, num_workers: int, progress: bool) -> dict:
        self.model.eval()
        logits, y = predict(self.model, data.test, batch_size, num_workers, self.device, "test", progress)
        return {k: v[0] for k, v in head_metrics(logits[:, None, :], y, data.multilabel).items()}

    def save(self, path: Path, fp: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"version": 1, "fingerprint": fp, "epoch": self.epoch, "step": self.step,
                     "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "history": self.history}, path)


def _check_finite_checkpoint(state: dict, path: Path) -> None:
    """A fine-tuning that diverges stops before it saves the epoch, so NaN or inf weights (or optimizer moments)
    in its checkpoint mean the file was damaged: resumed, the run would stop as "diverged, lower lr", blaming the
    settings instead of the file."""
    bad = [name for key in ("model", "optimizer") for name, t in _named_tensors(state.get(key), key)
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SyncoError(f"'{path}' holds values that are not finite (NaN or inf) in {', '.join(bad[:3])}{more}: the "
                         "file is damaged (a fine-tuning that diverges stops before saving such weights). Delete it, "
                         "or use resume=false, to start the fine-tuning over.")


def _named_tensors(obj, prefix: str):
    """(dotted name, tensor) of every tensor in nested dicts and lists (a state dict, an optimizer's state)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _named_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{prefix}.{i}")


def _loss_function(multilabel: bool, label_smoothing: float) -> Callable:
    if multilabel:
        def loss_fn(logits, y):
            return F.binary_cross_entropy_with_logits(logits, y.float())

        return loss_fn
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss_fn(logits, y):
        return ce(logits, y.long())

    return loss_fn


def _check_finite_loss(entry: dict) -> None:
    if not math.isfinite(entry["train_loss"]):
        raise SyncoError(f"fine-tuning diverged in epoch {entry['epoch']} (train loss {entry['train_loss']}): every "
                         "number after it would be meaningless. Lower lr (or clip_grad); nothing was written "
                         "for this epoch, and finetune.json is not.")


def _finetune_result(history: list, metric: str, data: ProbeData, meta: dict, checkpoint: str, n: int,
                     hp: FinetuneHParams, batch_size: int, lr: float, t0: float) -> dict:
    """The last evaluated epoch (the number to quote: no selection on test) and, for information, the best."""
    evaluated = [h for h in history if "test" in h]
    last = evaluated[-1]
    best = max(evaluated, key=lambda h: (h["test"][metric], h["epoch"]))
    result = {
        "protocol": "finetune", "checkpoint": checkpoint, "backbone": meta["backbone"], "backbone_meta": meta,
        "dataset": data.name, "num_classes": len(data.classes), "multilabel": data.multilabel, "metric": metric,
        "n_train": n, "n_test": len(data.test), "epochs": hp.epochs, "batch_size": batch_size, "lr": lr,
        metric: last["test"][metric], "epoch": last["epoch"],
        "best_epoch": best["epoch"], "best_" + metric: best["test"][metric],
        "history": history, "seconds": time.perf_counter() - t0,
    }
    if not data.multilabel:
        result["top5"] = last["test"]["top5"]
        result["best_top5"] = best["test"]["top5"]
    return result


def result_table(result: dict) -> str:
    metric = result["metric"]
    row = {"epochs": result["epochs"], "lr": f"{result['lr']:.3g}", f"test {metric}": result[metric]}
    if "top5" in result:
        row["test top5"] = result["top5"]
    row[f"best {metric} (epoch)"] = f"{result['best_' + metric]:.2f} ({result['best_epoch']})"
    return markdown_table([row], list(row))


def run_finetune(checkpoint: str, out: Path, opts: FinetuneOptions, progress: bool = True) -> dict:
    return run_probe(checkpoint, out, opts, finetune, "finetune", "Fine-tune", result_table, progress)
