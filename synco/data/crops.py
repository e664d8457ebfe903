"""What a DataLoader worker makes of one training image: both views as uint8 ``[2, 3, S, S]``.

Every image's views are keyed by one per-sample seed (:func:`synco.data.batch_augment.sample_seeds` of the run's
seed, the epoch and the dataset index). Each view's random resized crop box is drawn from that seed's counter-based
stream, as torchvision's ``RandomResizedCrop`` draws it on the **full** image, then cut and resized to ``S`` px
(antialiased bicubic, uint8: what ``v2.RandomResizedCrop`` does to a uint8 image). Then:

- :class:`ViewCrops` stops there (``data.augment.on=device``): flips, colour, grayscale, blur and solarisation
  run batched on the training device (:class:`~synco.data.batch_augment.BatchViews`, from the same seed);
- :class:`PerImageViews` also runs each view's other operations here (``data.augment.on=workers``,
  :func:`synco.data.transforms.view_ops`), from torch's generator seeded with the same seed.

Either way the workers return uint8, a quarter of float32's bytes through shared memory, and the training device
normalises. A JPEG whose crops all shrink by 2x or more is decoded at 1/2, 1/4 or 1/8 scale (PIL's ``draft``:
libjpeg scales in the DCT, so a 12-megapixel photo costs what a 0.2-megapixel one does); each box is then cut
from the smaller image at the same relative place, to the fraction of a pixel.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import v2

from .batch_augment import crop_boxes
from .folder import decode_rgb
from .transforms import BICUBIC, AugmentationParams, check_crop_p, view_ops


def _draft_scale(boxes: torch.Tensor, size: int) -> float:
    """How much every crop shrinks at least: the smallest of its sides over the output side."""
    return float(boxes[:, 2:].min()) / size


def _cut(image, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[2, 3, size, size]``: the boxes of ``image`` (a PIL image, possibly not yet decoded, or a uint8
    tensor), each resized to ``size`` x ``size`` with antialiased bicubic."""
    if isinstance(image, torch.Tensor):
        return _tensor_crops(image, boxes, size)
    full_w, full_h = image.size
    shrink = _draft_scale(boxes, size)
    if shrink >= 2 and getattr(image, "format", None) == "JPEG":  # PIL picks the largest scale 1/2^k within this
        image.draft(image.mode, (max(1, int(full_w // shrink)), max(1, int(full_h // shrink))))
    image = decode_rgb(image)
    if image.size == (full_w, full_h):
        # [3, H, W] over PIL's interleaved pixels (no second copy): the resize's uint8 kernel reads it fastest
        return _tensor_crops(torch.from_numpy(np.array(image)).permute(2, 0, 1), boxes, size)
    # decoded smaller: each box at its exact, fractional place, cut and resized by PIL (torchvision's bicubic)
    sx, sy = image.size[0] / full_w, image.size[1] / full_h
    crops = [image.resize((size, size), PIL.Image.BICUBIC, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
             for top, left, h, w in boxes.tolist()]
    return torch.from_numpy(np.stack([np.asarray(c) for c in crops])).permute(0, 3, 1, 2).contiguous()


def _tensor_crops(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    return torch.stack([v2.functional.resized_crop(pixels, *box.tolist(), [size, size], interpolation=BICUBIC,
                                                   antialias=True) for box in boxes])


def image_size(image) -> tuple[int, int]:
    """``(height, width)`` of a PIL image (known from its header) or a ``[..., H, W]`` tensor."""
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else image.size[::-1]


class ViewCrops:
    """``ViewCrops(size, (T, T'))(image, seed) -> uint8 [2, 3, size, size]``: each view's random resized crop of the
    full image (PIL, decoded or not, or a uint8 ``[3, H, W]`` tensor). ``boxes`` (``[2, 4]``, from :meth:`boxes`)
    may be given when already drawn, e.g. for a whole batch at once."""

    def __init__(self, size: int, views: tuple[AugmentationParams, AugmentationParams]):
        for p in views:
            check_crop_p(p)
        self.size, self.params = int(size), tuple(views)

    def boxes(self, seeds: torch.Tensor, height, width) -> torch.Tensor:
        """``[B, 2, 4]`` (top, left, height, width) of both views' crops for ``[B]`` seeds of images of ``height`` x
        ``width`` (ints, or per sample ``[B]``)."""
        return crop_boxes(self.params, torch.as_tensor(seeds, dtype=torch.int64).reshape(-1), height, width)

    def __call__(self, image, seed: int, boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        if boxes is None:
            boxes = self.boxes(torch.tensor([seed]), *image_size(image))[0]
        return _cut(image, boxes, self.size)


class PerImageViews(ViewCrops):
    """``PerImageViews(size, (T, T'))(image, seed) -> uint8 [2, 3, size, size]``: :class:`ViewCrops`, then each
    view's other operations (:func:`~synco.data.transforms.view_ops`) on this CPU, drawn from torch's generator
    seeded with ``seed`` (the caller's own random state is left as it was)."""

    def __init__(self, size: int, views: tuple[AugmentationParams, AugmentationParams]):
        super().__init__(size, views)
        self.ops = [view_ops(p, size) for p in views]

    def __call__(self, image, seed: int, boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        crops = list(super().__call__(image, seed, boxes))
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues seeds for every accelerator API (0.7 ms)
            torch.default_generator.manual_seed(seed & (2**63 - 1))
            for v, ops in enumerate(self.ops):
                for op in ops:
                    crops[v] = op(crops[v])
        return torch.stack([c.as_subclass(torch.Tensor) for c in crops])
