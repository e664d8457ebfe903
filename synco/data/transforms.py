"""Image transforms (torchvision.transforms.v2): BYOL pretraining views and evaluation pipelines.

All pipelines accept a PIL image or a uint8 tensor image and return a normalised float32 tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from synco.errors import SyncoError

BICUBIC = v2.InterpolationMode.BICUBIC


@dataclass(frozen=True)
class AugmentationParams:
    """One column of Table 11 (SynCo-v2 paper), i.e. the BYOL augmentation settings."""

    crop_p: float = 1.0  # must stay 1.0: every view has to be size x size to batch
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


# Table 11: the two views differ only in blur and solarisation probability.
BYOL_T = AugmentationParams(blur_p=1.0, solarize_p=0.0)
BYOL_T_PRIME = AugmentationParams(blur_p=0.1, solarize_p=0.2)


def view_params(augment) -> tuple[AugmentationParams, AugmentationParams]:
    """The two views ``(T, T')`` described by a ``data.augment`` config section (config.AugmentConfig)."""
    a = augment
    common = dict(flip_p=a.flip_p, color_jitter_p=a.jitter_p, brightness=a.jitter[0], contrast=a.jitter[1],
                  saturation=a.jitter[2], hue=a.jitter[3], grayscale_p=a.grayscale_p,
                  blur_sigma=tuple(a.blur_sigma), crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio))
    return tuple(AugmentationParams(blur_p=a.blur_p[v], solarize_p=a.solarize_p[v], **common) for v in (0, 1))


def blur_kernel_size(size: int) -> int:
    """The odd number nearest to 10% of the image side, at least 3 (BYOL's 23 px at 224)."""
    return max(3, 2 * round((0.1 * size - 1) / 2) + 1)


def _side(size) -> int:
    return min(size) if isinstance(size, (tuple, list)) else int(size)


def _to_normalized_tensor(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor()]


def byol_view(size, params: AugmentationParams, crop_scale=None,
              mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> v2.Compose:
    """One BYOL augmentation pipeline built from one column of Table 11 (``crop_scale`` overrides the params')."""
    p = params
    crop_scale = tuple(crop_scale) if crop_scale is not None else p.crop_scale
    if p.crop_p != 1.0:
        raise SyncoError(f"BYOL views need crop_p == 1.0 (got {p.crop_p}): an uncropped view would not "
                         f"have the requested size and could not be batched. Set crop_p to 1.0.")
    ops = [
        v2.ToImage(),  # uint8 tensor from here on: solarise threshold 128 is BYOL's 0.5
        v2.RandomResizedCrop(size, scale=crop_scale, ratio=p.crop_ratio, interpolation=BICUBIC, antialias=True),
    ]
    # Operations with probability 0 are left out: same distribution, less work per image.
    if p.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=p.flip_p))
    if p.color_jitter_p > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)],
                                  p=p.color_jitter_p))
    if p.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=p.grayscale_p))
    if p.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(_side(size)), sigma=p.blur_sigma)], p=p.blur_p))
    if p.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=p.solarize_p))
    return v2.Compose(ops + _to_normalized_tensor(mean, std))


def byol_transforms(size, crop_scale=None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                    views: tuple[AugmentationParams, AugmentationParams] = (BYOL_T, BYOL_T_PRIME)):
    """The asymmetric BYOL pair ``(T, T')``: Table 11 unless ``views`` (see :func:`view_params`) says otherwise."""
    return tuple(byol_view(size, p, crop_scale, mean, std) for p in views)


class TwoViews:
    """``TwoViews(t1, t2)(img) -> (t1(img), t2(img))``: two independently augmented views."""

    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n  t1={self.t1!r},\n  t2={self.t2!r})"


class _FitSquare(torch.nn.Module):
    """Resize the shorter side to ``side`` and centre-crop ``side`` x ``side``, unless already square and small."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, img):
        h, w = img.shape[-2:]
        if h == w and h <= self.side:
            return img
        img = v2.functional.resize(img, self.side, interpolation=BICUBIC, antialias=True)
        return v2.functional.center_crop(img, self.side)


def uint8_transform(size, crop_ratio: float = 224 / 256) -> v2.Compose:
    """What DataLoader workers do when the views are made on the device: decode, resize the shorter side to
    ``size / crop_ratio`` and centre-crop a square of that side, as uint8. Images already square and no larger
    (the built-in digits) pass through untouched. The device's random crops then sample that square."""
    return v2.Compose([v2.ToImage(), _FitSquare(round(_side(size) / crop_ratio)), v2.ToPureTensor()])


def eval_transform(size, crop_ratio: float = 224 / 256, interpolation=BICUBIC,
                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> v2.Compose:
    """Resize the shorter side to ``round(size / crop_ratio)`` (256 for 224), then centre-crop ``size``."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(round(_side(size) / crop_ratio), interpolation=interpolation, antialias=True),
        v2.CenterCrop(size),
        *_to_normalized_tensor(mean, std),
    ])


def train_classification_transform(size, crop_scale=(0.08, 1.0), mean=IMAGENET_DEFAULT_MEAN,
                                   std=IMAGENET_DEFAULT_STD) -> v2.Compose:
    """Random resized crop + horizontal flip, for linear probing and fine-tuning."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=crop_scale, interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        *_to_normalized_tensor(mean, std),
    ])
