"""Evaluation images for a frozen classifier: centre crop, an optional per-image effect, model input.

Robustness and adversarial evaluation read a dataset the same way: every image is centre-cropped as
:func:`synco.data.transforms.eval_transform` does, an effect (a corruption, a watermark) may alter the
cropped uint8 image, as ImageNet-C/-W were made, and the result becomes a float tensor, normalised
unless the attacked model normalises itself.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..data.transforms import BICUBIC
from ..errors import SyncoError


def center_crop_ops(size: int, crop_ratio: float) -> list:
    """uint8 CHW tensor at ``size``: the first half of :func:`synco.data.transforms.eval_transform`."""
    return [v2.ToImage(), v2.Resize(round(int(size) / crop_ratio), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(int(size))]


def uint8_to_input(normalize: bool = True) -> v2.Compose:
    """uint8 CHW tensor -> float32 in [0, 1], ImageNet-normalised when ``normalize``: the second half."""
    ops = [v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        ops.append(v2.Normalize(mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD)))
    return v2.Compose(ops + [v2.ToPureTensor()])


class BenchmarkView(Dataset):
    """``base[indices[i]]`` (a PIL image) -> centre crop -> ``effect(img, i)`` -> model input, head label.

    ``labels`` maps the base dataset's targets to the linear head's class indices (-1: unknown)."""

    def __init__(self, base, indices: Sequence[int], crop: list, effect: Optional[Callable] = None,
                 labels: Optional[Sequence[int]] = None, normalize: bool = True):
        self.base, self.indices = base, list(indices)
        self.crop, self.post = v2.Compose(crop), uint8_to_input(normalize)
        self.effect, self.labels = effect, None if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, target = self.base[self.indices[i]]
        x = self.crop(img)
        if self.effect is not None:
            x = self.effect(x, self.indices[i])
        return self.post(x), (self.labels[target] if self.labels is not None else int(target))


def subset_indices(n: int, max_images: Optional[int], seed: int) -> list[int]:
    """All of ``range(n)``, or a fixed random subset of ``max_images`` of them (sorted)."""
    if max_images is None or max_images >= n:
        return list(range(n))
    if max_images < 1:
        raise SyncoError(f"max_images must be at least 1, got {max_images}.")
    return sorted(np.random.default_rng(seed).permutation(n)[:max_images].tolist())
