"""What every evaluation protocol shares: options for data and backbone, loading the backbone, datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..data.build import build_dataset
from ..data.transforms import eval_transform
from ..device import resolve_device  # noqa: F401 (protocols import it from here)
from ..errors import SyncoError
from ..models.backbone import input_size, load_backbone


@dataclass
class EvalOptions:
    dataset: str = "digits"  # digits | folder | imagenet100
    root: Optional[str] = None
    class_list: Optional[str] = None
    image_size: Optional[int] = None  # default: the backbone's input size
    batch_size: int = 256
    num_workers: int = 4
    device: str = "auto"
    seed: int = 0
    backbone: Optional[str] = None  # a timm name or a synco preset name; needed for --checkpoint random
    backbone_kwargs: dict = field(default_factory=dict)


def backbone_spec(opts: EvalOptions) -> tuple[Optional[str], dict]:
    """``backbone`` may name a synco preset (e.g. cpu-demo): take its backbone and kwargs."""
    name, kwargs = opts.backbone, dict(opts.backbone_kwargs)
    if name:
        from ..config import load_config, preset_names

        if name in preset_names():
            mcfg = load_config(name, ["data.root=unused"] if name != "cpu-demo" else []).model
            name, kwargs = mcfg.backbone, {**mcfg.backbone_kwargs, **kwargs}
    return name, kwargs


def load_eval_backbone(checkpoint: str, opts: EvalOptions, device: torch.device):
    name, kwargs = backbone_spec(opts)
    if checkpoint == "random":
        torch.manual_seed(opts.seed)
        return load_backbone("random", backbone=name, backbone_kwargs=kwargs, device=device)
    return load_backbone(checkpoint, backbone=None, backbone_kwargs=kwargs, device=device)


def eval_image_size(opts: EvalOptions, model: torch.nn.Module) -> int:
    return int(opts.image_size or input_size(model))


# The usual evaluation crop: resize the short side to 256 for a 224 crop.
DEFAULT_CROP_RATIO = 224 / 256


def eval_split_and_crop(dataset: str) -> tuple[str, float]:
    """(split, centre-crop ratio) of a dataset's evaluation images. The built-in digits ship a train/test
    pair of tight 8x8 crops, with nothing around the digit to crop away; folders evaluate on 'val'."""
    return ("test", 1.0) if dataset == "digits" else ("val", DEFAULT_CROP_RATIO)


def build_eval_set(opts: EvalOptions, size: int, transform=None):
    """The evaluation split of ``opts.dataset`` (see :func:`eval_split_and_crop`)."""
    split, _ = eval_split_and_crop(opts.dataset)
    return build_dataset(opts.dataset, root=opts.root, split=split, transform=transform,
                         class_list=opts.class_list, image_size=size)


def eval_datasets(opts: EvalOptions, size: int, train_transform=None, test_transform=None):
    """(train, test) for the protocol; test is the evaluation split (:func:`eval_split_and_crop`)."""
    _, crop_ratio = eval_split_and_crop(opts.dataset)
    t_test = test_transform or eval_transform(size, crop_ratio=crop_ratio)
    train = build_dataset(opts.dataset, split="train", transform=train_transform or t_test, root=opts.root,
                          class_list=opts.class_list, image_size=size)
    test = build_eval_set(opts, size, t_test)
    if len(train.classes) != len(test.classes):
        raise SyncoError(f"train has {len(train.classes)} classes but the test split has {len(test.classes)}.")
    return train, test
