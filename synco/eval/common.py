"""What every evaluation protocol shares: options for data and backbone, loading the backbone, datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..data.build import create_dataset
from ..data.transforms import eval_transform
from ..device import resolve_device  # noqa: F401 (protocols import it from here)
from ..errors import SyncoError
from ..models.backbone import input_size, load_backbone, peek_meta
from ..options import MAX_IMAGE_SIZE, MAX_THREADS, SEED_RANGE, opt

MAX_EVAL_BATCH = 2**16  # a larger batch only fills memory: 65,536 images of 224 px are 39 GB in float32


@dataclass
class EvalOptions:
    dataset: str = "digits"  # digits | folder | imagenet100 (create_dataset names the choices)
    root: Optional[str] = None
    class_list: Optional[str] = None
    # default: the backbone's input size (a ViT or Swin takes only the size it was built for)
    image_size: Optional[int] = opt(None, ge=8, le=MAX_IMAGE_SIZE, why="or null for the backbone's own")
    batch_size: int = opt(256, ge=1, le=MAX_EVAL_BATCH)
    num_workers: int = opt(4, ge=0, le=MAX_THREADS)
    device: str = "auto"
    seed: int = opt(0, **SEED_RANGE)
    backbone: Optional[str] = None  # a timm name or a synco preset name; needed for --checkpoint random
    backbone_kwargs: dict = field(default_factory=dict)


def backbone_spec(opts: EvalOptions) -> tuple[Optional[str], dict]:
    """``backbone`` may name a synco preset (e.g. cpu-demo): take its backbone and kwargs."""
    name, kwargs = opts.backbone, dict(opts.backbone_kwargs)
    if name:
        from ..config import load_config, preset_names

        if name in preset_names():
            mcfg = load_config(name, needs_data=False).model
            name, kwargs = mcfg.backbone, {**mcfg.backbone_kwargs, **kwargs}
    return name, kwargs


def load_eval_backbone(checkpoint: str, opts: EvalOptions, device: torch.device):
    name, kwargs = backbone_spec(opts)
    if checkpoint == "random":
        torch.manual_seed(opts.seed)
        return load_backbone("random", backbone=name, backbone_kwargs=kwargs, device=device)
    # backbone= names the architecture of a safetensors file without metadata (it was ignored, then the load
    # asked for it); a file that carries its own architecture keeps it (visualize gives one backbone= for a
    # random checkpoint beside trained ones, and check_backbone_option refuses a contradicting one for eval).
    arch = name if name and peek_meta(checkpoint) is None else None
    return load_backbone(checkpoint, backbone=arch, backbone_kwargs=kwargs, device=device)


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of the model's weights and buffers themselves (names, dtypes, shapes, bytes): the same for
    the same weights wherever they were loaded from, different as soon as one value changes. Caches and
    resume fingerprints are keyed by it, never by a checkpoint's path or time stamp."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def eval_image_size(opts: EvalOptions, model: torch.nn.Module) -> int:
    """``image_size=`` or the backbone's own size; a backbone built for one size (timm's strict patch embedding:
    ViT, DeiT, Swin) takes no other, and would fail on the first batch with an assertion."""
    size = int(input_size(model))
    if opts.image_size and opts.image_size != size and _fixed_input_size(model):
        raise SyncoError(f"option 'image_size': this backbone is built for {size} px inputs and takes no other "
                         f"size, got image_size={opts.image_size}. Drop image_size= (or give {size}).")
    return int(opts.image_size or size)


def _fixed_input_size(model: torch.nn.Module) -> bool:
    patch = getattr(model, "patch_embed", None)
    return bool(getattr(patch, "strict_img_size", False)) and not getattr(model, "dynamic_img_size", False)


# The usual evaluation crop: resize the short side to 256 for a 224 crop.
DEFAULT_CROP_RATIO = 224 / 256
# crop_ratio= options: above 1 the centre crop would be larger than the resized image.
CROP_RATIO = dict(gt=0, le=1, why="the centre crop's share of the resized image, 224/256 by default; or null")


def eval_split_and_crop(dataset: str) -> tuple[str, float]:
    """(split, centre-crop ratio) of a dataset's evaluation images. The built-in digits ship a train/test
    pair of tight 8x8 crops, with nothing around the digit to crop away; folders evaluate on 'val'."""
    return ("test", 1.0) if dataset == "digits" else ("val", DEFAULT_CROP_RATIO)


def create_eval_set(opts: EvalOptions, size: int, transform=None, unreadable: str = "error"):
    """The evaluation split of ``opts.dataset`` (see :func:`eval_split_and_crop`). ``unreadable="error"``: an
    unreadable image stops the evaluation naming it, never replaced by its neighbour (counted twice, silently)."""
    split, _ = eval_split_and_crop(opts.dataset)
    return create_dataset(opts.dataset, root=opts.root, split=split, transform=transform,
                          class_list=opts.class_list, image_size=size, unreadable=unreadable)


def eval_datasets(opts: EvalOptions, size: int, train_transform=None, test_transform=None,
                  unreadable: str = "error"):
    """(train, test) for the protocol; test is the evaluation split (:func:`eval_split_and_crop`). ``strict``: as
    for :func:`create_eval_set`, on both splits (the k-NN bank and the probes' training images are numbers too)."""
    _, crop_ratio = eval_split_and_crop(opts.dataset)
    t_test = test_transform or eval_transform(size, crop_ratio=crop_ratio)
    train = create_dataset(opts.dataset, split="train", transform=train_transform or t_test, root=opts.root,
                           class_list=opts.class_list, image_size=size, unreadable=unreadable)
    test = create_eval_set(opts, size, t_test, unreadable)
    check_same_classes(list(train.classes), list(test.classes), opts.root)
    return train, test


def check_same_classes(train: list, test: list, root=None) -> None:
    """Labels are positions in each split's sorted class list, so the two lists must be the same names: a
    renamed or missing folder would shift every label after it and score against the wrong classes."""
    if [str(c) for c in train] == [str(c) for c in test]:
        return
    only_train = [str(c) for c in train if c not in set(test)]
    only_test = [str(c) for c in test if c not in set(train)]
    detail = "; ".join(part for part in (
        f"only in train: {', '.join(only_train[:5])}{' ...' if len(only_train) > 5 else ''}" if only_train else "",
        f"only in the evaluation split: {', '.join(only_test[:5])}{' ...' if len(only_test) > 5 else ''}"
        if only_test else "") if part)
    where = f" of {root}" if root else ""
    raise SyncoError(f"the train and evaluation splits{where} have different classes ({detail}). Classes are "
                     "matched by folder name: rename the folders so both splits hold the same class names, or "
                     "pass class_list= with the classes to use.")
