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


def eval_datasets(opts: EvalOptions, size: int, train_transform=None, test_transform=None):
    """(train, test) for the protocol; the test split is 'test' for digits and 'val' for folders."""
    crop_ratio = 1.0 if opts.dataset == "digits" else 224 / 256
    t_test = test_transform or eval_transform(size, crop_ratio=crop_ratio)
    kwargs = dict(root=opts.root, class_list=opts.class_list, image_size=size)
    train = build_dataset(opts.dataset, split="train", transform=train_transform or t_test, **kwargs)
    test = build_dataset(opts.dataset, split="val" if opts.dataset != "digits" else "test", transform=t_test,
                         **kwargs)
    if len(train.classes) != len(test.classes):
        raise SyncoError(f"train has {len(train.classes)} classes but the test split has {len(test.classes)}.")
    return train, test
