"""What the linear probe and fine-tuning share: their data, recipe checks, the batch-scaled learning
rate, seeded epochs, resume fingerprints, per-head scores and report columns.

Both train a classifier for ``epochs`` epochs of SGD on a frozen or unfrozen backbone and resume a killed
run to the same weights: every epoch's batch order and augmentation draw from a seed of (seed, epoch,
stream), and a checkpoint carries the settings it was made with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.transforms import train_classification_transform
from ..device import resolve_device
from ..engine import dist
from ..errors import SyncoError, key_error
from ..options import check_options, opt
from ..resume import config_differences
from .common import EvalOptions, eval_datasets, eval_image_size, load_eval_backbone

# Options that change nothing in the numbers: a resumed run may differ in them.
RESUME_FREE = {"device", "num_workers", "resume", "eval_every"}


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


def dataset_targets(dataset) -> Optional[list]:
    t = getattr(dataset, "targets", None)
    return list(t) if t is not None else None


def probe_data(opts: EvalOptions, size: int, crop_scale) -> ProbeData:
    train_tf = train_classification_transform(size, crop_scale=tuple(crop_scale))
    train_aug, test = eval_datasets(opts, size, train_transform=train_tf)
    train_eval, _ = eval_datasets(opts, size)
    return ProbeData(train_aug, train_eval, test, list(test.classes), dataset_targets(train_eval), False,
                     opts.dataset)


def protocol_inputs(checkpoint: str, opts) -> tuple[nn.Module, dict, ProbeData, dict]:
    """(backbone, its meta, data, keyword arguments) for ``linear_probe`` / ``finetune`` from the options of
    `synco eval linear` / `finetune` (an :class:`EvalOptions` with a recipe's ``crop_scale``)."""
    check_eval_options(opts)
    device = resolve_device(opts.device)
    backbone, meta = load_eval_backbone(checkpoint, opts, device)
    size = eval_image_size(opts, backbone)
    data = probe_data(opts, size, opts.crop_scale)
    kwargs = dict(batch_size=opts.batch_size, num_workers=opts.num_workers, seed=opts.seed, device=device,
                  image_size=size, checkpoint=checkpoint,
                  fp_extra={"dataset": opts.dataset, "root": opts.root, "class_list": opts.class_list})
    return backbone, meta, data, kwargs


# ---------------------------------------------------------------------------------------------
# Checks and the learning rate


@dataclass
class SGDRecipe:
    """What the linear probe and fine-tuning share: SGD with warm-up and cosine, label smoothing, random resized
    crops, evaluation cadence and resume (each protocol adds its own fields, and its own defaults where they
    differ: ``LinearHParams``, ``FinetuneHParams``)."""

    epochs: int = opt(100, ge=1)
    warmup_epochs: int = opt(5, ge=0)
    # lr = lr x batch_size / lr_batch_ref (the linear scaling rule); 0 = the lr as given
    lr_batch_ref: int = opt(256, ge=0, why="0 = no batch-size scaling")
    momentum: float = opt(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = opt(0.0, ge=0)
    label_smoothing: float = opt(0.1, ge=0, lt=1)
    crop_scale: list[float] = opt(factory=lambda: [0.08, 1.0], length=2, gt=0, le=1, why="[min, max]")
    eval_every: int = opt(1, ge=1)  # evaluate every N epochs (and at the end)
    resume: bool = True  # continue from the protocol's own checkpoint in --out when it exists


def check_recipe(h, prefix: str = "") -> None:
    """The checks every SGD recipe (``LinearHParams``, ``FinetuneHParams``) passes: each field's declared bounds
    (also when called as a library, without the command line), then the rules between fields."""
    check_options(h, prefix=prefix)
    refuse = key_error("option", prefix)
    if h.warmup_epochs > h.epochs:
        refuse("warmup_epochs", f"must be in [0, epochs={h.epochs}], got {h.warmup_epochs}.")
    if h.nesterov and h.momentum == 0:
        refuse("nesterov", "Nesterov momentum needs momentum > 0.")
    if h.crop_scale[0] > h.crop_scale[1]:
        refuse("crop_scale", f"must be [min, max] with min <= max, got {h.crop_scale}.")


def check_eval_options(o: EvalOptions) -> None:
    """The batch against the processes of this launch (the fields' own bounds are declared on EvalOptions)."""
    check_options(o)
    if o.batch_size < dist.world_size():
        raise SyncoError(f"option 'batch_size': the total batch {o.batch_size} is smaller than the "
                         f"{dist.world_size()} processes; raise batch_size.")


def batch_scaled_lr(value: float, batch_size: int, ref: int) -> float:
    """``value x batch_size / ref``, the linear scaling rule; ``ref=0`` keeps ``value``."""
    return float(value) * batch_size / ref if ref else float(value)


# ---------------------------------------------------------------------------------------------
# Seeded epochs


def epoch_draw_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of one epoch's random draws: stream 0 orders the batches, stream ``rank + 1`` is that
    process's augmentation (and dropout)."""
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729 + 17) % 2**31


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The global batches of one epoch (positions in the training subset): a seeded permutation cut into
    full batches (the remainder is dropped; a set smaller than one batch is one batch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_draw_seed(seed, epoch)))
    if n <= batch_size:
        return [perm]
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def augmented_loader(dataset: Dataset, batches: list[torch.Tensor], aug_seed: int, num_workers: int,
                     device: torch.device) -> DataLoader:
    """This process's share (``rank::world``) of each global batch, augmented from ``aug_seed``. The global seed
    is set too: augmentation in the main process (num_workers=0) and dropout draw from it."""
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(aug_seed)
    return DataLoader(dataset, batch_sampler=[b[rank::world].tolist() for b in batches], num_workers=num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(aug_seed))


# ---------------------------------------------------------------------------------------------
# Resume


def fingerprint(opts, extra: dict) -> dict:
    """The settings a checkpoint is made with, as JSON values (what a resumed run is compared against)."""
    return json.loads(json.dumps({**asdict(opts), **extra}, default=str, sort_keys=True))


def resume_state(path: Path, fp: dict, resume: bool, needs: dict) -> Optional[dict]:
    """The probe checkpoint to continue from, or None to start over. ``fp["weights"]`` is the backbone's weights
    hash: a checkpoint made on other weights (the pretraining went further under the same path) is stale and
    is started over, never resumed or returned as finished. Other settings must match (:func:`check_resumable`);
    ``needs`` maps each key to its type, checked so that a damaged file is one paragraph, not a traceback."""
    from ..io import load_torch_file

    if not resume or not path.exists():
        return None
    state = load_torch_file(path)
    saved = state.get("fingerprint") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise SyncoError(f"'{path}' is not a synco probe checkpoint (no settings fingerprint); delete it or use "
                         "resume=false to start over.")
    if saved.get("weights") != fp.get("weights"):
        logging.getLogger("synco.eval").warning(
            "%s was made on other backbone weights than --checkpoint holds now: starting over", path)
        return None
    check_resumable(saved, fp, path)
    wrong = [k for k, t in needs.items() if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if wrong:
        raise SyncoError(f"'{path}' is damaged ({', '.join(wrong)} missing or of the wrong type); delete it or "
                         "use resume=false to start over.")
    return state


def check_resumable(saved: dict, current: dict, path: Path) -> None:
    diffs = config_differences(saved, current, RESUME_FREE)
    if diffs:
        listed = "; ".join(f"{d.key}: {d.saved!r} -> {d.current!r}" for d in diffs[:5])
        raise SyncoError(f"'{path}' belongs to a run with other settings ({listed}). Use the same settings to "
                         "resume, resume=false to start over, or another --out.")


# ---------------------------------------------------------------------------------------------
# Scores and report


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


def report_columns(result: dict, prefix: str) -> dict:
    """The columns `synco report` shows for a result: ``"<prefix> top-1"`` (or mAP) and top-5."""
    metric = result["metric"]
    cols = {f"{prefix} {'top-1' if metric == 'top1' else 'mAP'}": result[metric]}
    if "top5" in result:
        cols[f"{prefix} top-5"] = result["top5"]
    return cols


def run_probe(checkpoint: str, out: Path, opts, train, name: str, label: str, summary, progress: bool = True) -> dict:
    """One probe command (linear, finetune): check the recipe, load the backbone and data, ``train`` them, record
    ``<name>.json`` with the options and the report columns (``label``), and print ``summary(result)`` (rank 0)."""
    from .results import save_result

    check_recipe(opts)
    backbone, meta, data, kwargs = protocol_inputs(checkpoint, opts)
    result = train(backbone, meta, data, Path(out), opts, progress=progress, **kwargs)
    result["options"] = asdict(opts)
    result["report"] = report_columns(result, label)
    if dist.is_main():
        save_result(out, name, result)
        print(summary(result))
    return result
