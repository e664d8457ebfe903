"""Image transforms (torchvision.transforms.v2): BYOL pretraining views and evaluation pipelines.

All pipelines accept a PIL image or a uint8 tensor image and return a normalised float32 tensor, but for the
training views' pieces (:func:`view_ops`, :class:`GaussianBlur`), which work on uint8 images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import PIL.Image
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


class GaussianBlur(v2.GaussianBlur):
    """torchvision's ``GaussianBlur`` (the same sigma draw, kernel, reflect borders and rounding) computed as two
    matrix products: each axis's reflect-padded Gaussian folded into a banded ``[n, n]`` matrix, as the device path
    resamples its crops. torchvision convolves with the dense 23 x 23 kernel (529 taps per pixel at 224 px, about
    two thirds of a view's time); this is 2 x 224 multiply-adds per pixel, on any kernel size, to float rounding."""

    def transform(self, inpt, params: dict):
        if isinstance(inpt, PIL.Image.Image):
            return v2.functional.to_pil_image(gaussian_blur(v2.functional.pil_to_tensor(inpt), self.kernel_size,
                                                            params["sigma"]), mode=inpt.mode)
        return gaussian_blur(inpt, self.kernel_size, params["sigma"])


def _blur_matrix(n: int, kernel_size: int, sigma: float) -> torch.Tensor:
    """``[n, n]``: row i holds the 1-D Gaussian of torchvision's kernel centred on pixel i, its taps outside the
    image folded back in by reflection (``torch.nn.functional.pad(mode='reflect')``)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    taps = torch.softmax(torch.linspace(-lim, lim, kernel_size).div(sigma).pow(2).neg(), 0)
    # Denormal taps (small sigma: exp(-100) and beyond) add nothing a float32 sum can hold, and would make the
    # matrix products several times slower on x86.
    taps = torch.where(taps < torch.finfo(taps.dtype).tiny, 0.0, taps)
    idx = (torch.arange(n)[:, None] + torch.arange(kernel_size)[None, :] - kernel_size // 2).abs()
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx).clamp_(0, n - 1)
    return torch.zeros(n, n).scatter_add_(1, idx, taps.expand(n, -1).contiguous())


def gaussian_blur(image: torch.Tensor, kernel_size, sigma) -> torch.Tensor:
    """``v2.functional.gaussian_blur`` of a ``[..., C, H, W]`` image (uint8 rounded back to uint8, as torchvision)."""
    kx, ky = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    sx, sy = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    h, w = image.shape[-2:]
    fp = image.is_floating_point()
    x = image if fp else image.to(torch.float32)
    out = _blur_matrix(h, ky, sy).to(x) @ x @ _blur_matrix(w, kx, sx).to(x).t()
    return out if fp else out.round_().clamp_(0, 255).to(image.dtype)


def view_ops(params: AugmentationParams, size: int) -> list:
    """One BYOL view's operations after its random resized crop to ``size`` (one column of Table 11): uint8 in,
    uint8 out.
    Ops with probability 0 are left out (same distribution, less work). Colour jitter and grayscale run on a PIL
    image (torchvision's PIL kernels, as BYOL's and MoCo's loaders: about half the time of its uint8 tensor
    kernels, hue most of all); the blur is :class:`GaussianBlur`."""
    p, ops = params, []
    if p.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=p.flip_p))
    colour = []
    if p.color_jitter_p > 0:
        colour.append(v2.RandomApply([v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)],
                                     p=p.color_jitter_p))
    if p.grayscale_p > 0:
        colour.append(v2.RandomGrayscale(p=p.grayscale_p))
    if colour:
        ops += [v2.ToPILImage(), *colour, v2.PILToTensor()]
    if p.blur_p > 0:
        ops.append(v2.RandomApply([GaussianBlur(blur_kernel_size(size), sigma=p.blur_sigma)], p=p.blur_p))
    if p.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=p.solarize_p))
    return ops


def byol_view(size, params: AugmentationParams, crop_scale=None,
              mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> v2.Compose:
    """One BYOL augmentation pipeline built from one column of Table 11 (``crop_scale`` overrides the params'):
    the random resized crop, :func:`view_ops`, then float conversion and normalisation."""
    p = params
    crop_scale = tuple(crop_scale) if crop_scale is not None else p.crop_scale
    check_crop_p(p)
    crop = v2.RandomResizedCrop(size, scale=crop_scale, ratio=p.crop_ratio, interpolation=BICUBIC, antialias=True)
    # uint8 from the crop on: the solarise threshold 128 is BYOL's 0.5
    return v2.Compose([v2.ToImage(), crop, *view_ops(p, _side(size)), *_to_normalized_tensor(mean, std)])


def check_crop_p(p: AugmentationParams) -> None:
    if p.crop_p != 1.0:
        raise SyncoError(f"BYOL views need crop_p == 1.0 (got {p.crop_p}): an uncropped view would not "
                         f"have the requested size and could not be batched. Set crop_p to 1.0.")


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
