"""The two BYOL views of Table 11 made per batch on the training device, with per-sample random parameters.

The per-image path (:func:`synco.data.transforms.byol_view`, run in DataLoader workers) and this one draw
every parameter from the same distributions; here the DataLoader only delivers uint8 images of one size,
and :class:`BatchViews` makes both views of the whole batch at once (as one batch of 2B)::

    views = BatchViews(size, view_params(cfg.data.augment), mean, std).to(device)
    x1, x2 = views(images_uint8.to(device), sample_seeds(seed, epoch, indices))

Randomness. Every random number of sample ``b`` is a counter-based hash of ``seeds[b]`` (splitmix64 over a
fixed slot per parameter), drawn on the CPU for the whole batch in a few vectorised integer operations. A
sample's views therefore depend only on its seed and its image: not on the other samples of the batch, the
batch size, the rank or the worker, so one process with batch 2b gives the views of two processes with
batch b, and a resumed run gives the views it would have given. Each parameter has its own slot, so changing
one probability (or switching an op off) does not move the random numbers of the others.

The operations, in the per-image order, each with its per-view probability (an op with probability 0, or a
jitter component of strength 0, is skipped entirely):

- random resized crop (torchvision's 10-attempt box sampler, exactly) + horizontal flip, as one separable
  resampling per sample with PyTorch's antialiased bicubic weights (``F.interpolate(..., 'bicubic',
  antialias=True)``, what ``v2.RandomResizedCrop(interpolation=BICUBIC, antialias=True)`` runs): two batched
  matrix products, the flip folded into the column weights, the weights gathered from a table per crop length
  cached per (input size, output size, device). kornia's per-sample crops (``crop_by_indices``) loop over the
  batch and smooth with a Gaussian before downscaling, and ``crop_and_resize`` is bilinear without antialias:
  neither is the per-image path's resampling;
- colour jitter with a random order of brightness, contrast, saturation and hue per sample (torchvision's
  ``ColorJitter`` semantics; bit for bit kornia's per-sample functionals ``adjust_brightness_accumulative``,
  ``adjust_contrast_with_mean_subtraction`` and ``adjust_saturation_with_gray_subtraction``, run as one blend
  per round, and ``adjust_hue``);
- grayscale (torchvision's luma weights), Gaussian blur with a per-sample sigma and
  ``blur_kernel_size(size)`` taps (``kornia.filters.gaussian_blur2d``, reflect borders), solarise at 0.5;
- normalisation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from kornia.color import rgb_to_grayscale
from kornia.enhance import adjust_hue
from kornia.filters import gaussian_blur2d
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from synco.data.transforms import (
    BYOL_T,
    BYOL_T_PRIME,
    AugmentationParams,
    blur_kernel_size,
    check_crop_p,
    view_params,
)
from synco.errors import SyncoError

# ---------------------------------------------------------------------------------------------------------------
# Counter-based random numbers: splitmix64 in int64 arithmetic (torch integer ops wrap around modulo 2**64).

_U64 = 1 << 64


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    c %= _U64
    return c - _U64 if c >= 1 << 63 else c


_GAMMA = _s64(0x9E3779B97F4A7C15)
_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bits: torch's ``>>`` on int64 is arithmetic."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (a bijection of 64-bit words), elementwise on an int64 tensor."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` float64 numbers in [0, 1): the ``counters[k]``-th number of the stream keyed by ``seeds[b]``.

    Number k of stream s is ``mix64(mix64(s) + (k + 1) * gamma) >> 11`` scaled by 2**-53: a function of (s, k)
    alone, computed for any set of (s, k) at once.
    """
    key = mix64(seeds.to(torch.int64).reshape(-1))
    z = mix64(key[:, None] + (counters.to(torch.int64)[None, :] + 1) * _GAMMA)
    return _shr(z, 11).to(torch.float64) * 2.0 ** -53


def sample_seeds(seed: int, epoch: int, indices) -> torch.Tensor:
    """``[B]`` int64 per-sample seeds from (run seed, epoch, dataset index), hashed so that no two
    (epoch, index) pairs of a run share a stream (whatever the dataset size)."""
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    s = mix64(torch.tensor([_s64(seed)], dtype=torch.int64))
    s = mix64(s + _s64(epoch * _GAMMA))
    return mix64(s + idx)


# Slots of a view's 64 numbers. View v uses counters 64 * v + slot.
_SLOTS_PER_VIEW = 64
_CROP_ATTEMPTS = 10  # slots 0..39: (area, log ratio, top, left) per attempt, as torchvision draws them
_FLIP, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _ORDER, _GRAY, _BLUR, _SIGMA, _SOLAR = range(40, 51)
_PERMS = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.int64)  # 24 orders of (b, c, s, h)
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (kornia's default is 0.299)


@dataclass
class ViewDraw:
    """One view's per-sample parameters for a batch (CPU tensors, ``B`` rows)."""

    box: torch.Tensor  # [B, 4] int64: top, left, height, width of the crop
    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B] bool: colour jitter applied
    factors: torch.Tensor  # [B, 4] float64: brightness, contrast, saturation factors and hue shift (turns)
    order: torch.Tensor  # [B, 4] int64: the jitter ops (0 b, 1 c, 2 s, 3 h) in the order they are applied
    gray: torch.Tensor  # [B] bool
    blur: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] float64
    solarize: torch.Tensor  # [B] bool


def _crop_boxes(u: torch.Tensor, height, width, scale, ratio) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` box sampler (10 attempts, then the centre-crop fallback), vectorised.

    ``u``: ``[B, 40]`` uniforms; ``height``, ``width``: the image size, one for all (ints) or per sample (``[B]``).
    Returns ``[B, 4]`` (top, left, height, width).
    """
    B = u.shape[0]
    u = u.reshape(B, _CROP_ATTEMPTS, 4)
    height = torch.as_tensor(height, dtype=torch.int64).expand(B)
    width = torch.as_tensor(width, dtype=torch.int64).expand(B)
    area = (height * width).to(torch.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = ok.to(torch.int8).argmax(1)  # the first valid attempt (0 when none is)
    rows = torch.arange(B)
    h, w, ui, uj = h[rows, first], w[rows, first], u[rows, first, 2], u[rows, first, 3]
    top = torch.minimum(torch.floor(ui * (height - h + 1)).to(torch.int64), height - h)
    left = torch.minimum(torch.floor(uj * (width - w + 1)).to(torch.int64), width - w)
    # Fallback: the central crop with the aspect ratio clamped to ``ratio``.
    fheight, fwidth = height.to(torch.float64), width.to(torch.float64)  # Python's float arithmetic, not float32
    in_ratio = fwidth / fheight
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(fheight * max(ratio)).to(torch.int64), width)
    fh = torch.where(narrow, torch.round(fwidth / min(ratio)).to(torch.int64), height)
    any_ok = ok.any(1)
    top = torch.where(any_ok, top, (height - fh) // 2)
    left = torch.where(any_ok, left, (width - fw) // 2)
    h = torch.where(any_ok, h, fh)
    w = torch.where(any_ok, w, fw)
    return torch.stack([top, left, h, w], 1)


def crop_boxes(views: tuple[AugmentationParams, ...], seeds: torch.Tensor, height, width) -> torch.Tensor:
    """``[B, V, 4]`` (top, left, height, width): the crop boxes :func:`draw_view` draws for ``[B]`` seeds and each of
    the ``V`` views, alone (what DataLoader workers need to cut the crops from the full images); ``height`` and
    ``width`` are ints or per-sample ``[B]``. One pass when the views share their crop scale and ratio."""
    counters = torch.cat([torch.arange(4 * _CROP_ATTEMPTS, dtype=torch.int64) + _SLOTS_PER_VIEW * v
                          for v in range(len(views))])
    u = uniforms(seeds.cpu(), counters).view(-1, 4 * _CROP_ATTEMPTS)  # row b * V + v
    V = len(views)
    if len({(tuple(p.crop_scale), tuple(p.crop_ratio)) for p in views}) == 1:
        size = [torch.as_tensor(n, dtype=torch.int64).expand(len(seeds)).repeat_interleave(V) for n in (height, width)]
        return _crop_boxes(u, *size, views[0].crop_scale, views[0].crop_ratio).view(-1, V, 4)
    u = u.view(-1, V, 4 * _CROP_ATTEMPTS)
    return torch.stack([_crop_boxes(u[:, v], height, width, p.crop_scale, p.crop_ratio)
                        for v, p in enumerate(views)], 1)


def draw_view(p: AugmentationParams, seeds: torch.Tensor, view: int, height: int, width: int) -> ViewDraw:
    """Per-sample parameters of one view (``view`` = 0 or 1 selects its counters) for ``[B]`` seeds."""
    counters = torch.arange(_SLOTS_PER_VIEW, dtype=torch.int64) + _SLOTS_PER_VIEW * view
    u = uniforms(seeds.cpu(), counters)

    def between(lo, hi, col):
        return lo + (hi - lo) * u[:, col]

    b, c, s, h = p.brightness, p.contrast, p.saturation, p.hue
    factors = torch.stack([between(max(0.0, 1 - b), 1 + b, _BRIGHT), between(max(0.0, 1 - c), 1 + c, _CONTRAST),
                           between(max(0.0, 1 - s), 1 + s, _SAT), between(-h, h, _HUE)], 1)
    order = _PERMS[torch.floor(u[:, _ORDER] * 24).to(torch.int64).clamp_(max=23)]
    return ViewDraw(
        box=_crop_boxes(u[:, : 4 * _CROP_ATTEMPTS], height, width, p.crop_scale, p.crop_ratio),
        flip=u[:, _FLIP] < p.flip_p,
        jitter=u[:, _JITTER] < p.color_jitter_p,
        factors=factors,
        order=order,
        gray=u[:, _GRAY] < p.grayscale_p,
        blur=u[:, _BLUR] < p.blur_p,
        sigma=between(p.blur_sigma[0], p.blur_sigma[1], _SIGMA),
        solarize=u[:, _SOLAR] < p.solarize_p,
    )


# ---------------------------------------------------------------------------------------------------------------
# Crop + resize + flip as two batched matrix products.

def _cubic_aa(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """The bicubic filter of PyTorch's (and PIL's) antialiased resampling."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """``[B, out_size, in_size]`` weights that resample input pixels ``[start, start + length)`` onto
    ``out_size`` pixels exactly as ``F.interpolate(crop, mode='bicubic', antialias=True, align_corners=False)``
    does along one axis (filter support widened by the scale when downsampling, weights renormalised over
    the pixels of the crop)."""
    start = start.to(torch.float64)[:, None, None]
    length = length.to(torch.float64)[:, None, None]
    scale = length / out_size
    stretch = scale.clamp(min=1.0)  # support 2 * stretch, argument divided by stretch
    centre = scale * (torch.arange(out_size, dtype=torch.float64, device=start.device)[None, :, None] + 0.5)
    rel = torch.arange(in_size, dtype=torch.float64, device=start.device)[None, None, :] - start
    w = _cubic_aa((rel + 0.5 - centre) / stretch) * ((rel >= 0) & (rel < length))
    return (w / w.sum(-1, keepdim=True)).to(torch.float32)


def _weight_table(in_size: int, out_size: int, device) -> torch.Tensor:
    """``[in_size + 1, out_size, in_size]``: row ``L`` resamples the crop ``[0, L)`` (row 0 unused)."""
    lengths = torch.arange(in_size + 1, device=device).clamp(min=1)
    return resample_weights(torch.zeros_like(lengths), lengths, in_size, out_size)


_TABLES: dict = {}


def crop_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """:func:`resample_weights` for a batch of crops, gathered from a cached per-length table shifted by
    ``start`` (a few passes over ``[B, out, in]`` instead of the filter's twenty)."""
    key = (in_size, out_size, start.device)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = _weight_table(in_size, out_size, start.device)
    rel = torch.arange(in_size, device=start.device)[None, :] - start[:, None]  # [B, in]
    inside = (rel >= 0) & (rel < length[:, None])
    rel = rel.clamp_(0, in_size - 1)[:, None, :].expand(-1, out_size, -1)
    return table[length].gather(2, rel) * inside[:, None, :]


def resized_crop(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, C, size, size]``: each sample's ``box`` (top, left, height, width) resized with antialiased
    bicubic, mirrored where ``flip``, clamped to [0, 1] (the per-image path rounds to uint8 here)."""
    H, W = x.shape[-2:]
    box = box.to(x.device, non_blocking=True)
    flip = flip.to(x.device, non_blocking=True)
    wy = crop_weights(box[:, 0], box[:, 2], H, size)  # [B, size, H]
    wx = crop_weights(box[:, 1], box[:, 3], W, size)  # [B, size, W]
    wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    out = torch.matmul(torch.matmul(wy[:, None], x), wx.transpose(1, 2)[:, None])
    return out.clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------

def _apply_where(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """``x`` with ``fn(x[rows], rows)`` written (in place) into the rows where the CPU bool ``mask`` is set.

    The rows are known on the CPU, so nothing waits for the device."""
    rows = mask.nonzero().reshape(-1)
    if rows.numel() == 0:
        return x
    dev_rows = rows.to(x.device, non_blocking=True)
    if rows.numel() == x.shape[0]:
        return fn(x, rows)
    return x.index_copy_(0, dev_rows, fn(x.index_select(0, dev_rows), rows))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` of float images in [0, 1]; uint8 images are scaled to [0, 1] first."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    return (x - mean.to(x.device)) / std.to(x.device)


def _tensor_factor(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(torch.float32).to(x.device, non_blocking=True)


def _components(p: AugmentationParams) -> torch.Tensor:
    """``[4]`` bool: which of brightness, contrast, saturation and hue the view jitters (torchvision leaves out a
    component of strength 0, and the whole jitter at probability 0)."""
    return torch.tensor([s > 0 and p.color_jitter_p > 0 for s in (p.brightness, p.contrast, p.saturation, p.hue)])


class BatchViews(nn.Module):
    """``BatchViews(size, (T, T'), mean, std)(images, seeds) -> (x1, x2)``: both BYOL views of a batch.

    ``images``: ``[B, 3, H, W]`` uint8 (or float in [0, 1]) on any device, all of one size; ``seeds``:
    ``[B]`` int64 (see :func:`sample_seeds`). Returns two float32 normalised ``[B, 3, size, size]``
    tensors on the images' device. Parameters are drawn on the CPU; the images never leave their device.
    """

    def __init__(self, size: int, views: tuple[AugmentationParams, AugmentationParams] = (BYOL_T, BYOL_T_PRIME),
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        super().__init__()
        if len(views) != 2:
            raise SyncoError(f"BatchViews makes two views; got {len(views)} parameter sets.")
        for p in views:
            check_crop_p(p)
        self.size = int(size)
        self.views = tuple(views)
        self.kernel_size = blur_kernel_size(self.size)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("gray_weights", torch.tensor(_GRAY_WEIGHTS, dtype=torch.float32), persistent=False)

    @classmethod
    def from_config(cls, augment, size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> BatchViews:
        """From a ``data.augment`` config section (config.AugmentConfig), as the per-image path reads it."""
        return cls(size, view_params(augment), mean, std)

    def extra_repr(self) -> str:
        return f"size={self.size}, blur_kernel={self.kernel_size},\nT={self.views[0]},\nT'={self.views[1]}"

    # -- parameters --------------------------------------------------------------------------------------------
    def draw(self, seeds: torch.Tensor, height: int, width: int) -> tuple[ViewDraw, ViewDraw]:
        """Both views' per-sample parameters for images of ``height`` x ``width`` (CPU tensors)."""
        seeds = torch.as_tensor(seeds, dtype=torch.int64).cpu().reshape(-1)
        return tuple(draw_view(p, seeds, v, height, width) for v, p in enumerate(self.views))

    # -- application -------------------------------------------------------------------------------------------
    def _jitter(self, x: torch.Tensor, d: ViewDraw, on: torch.Tensor) -> torch.Tensor:
        """Four rounds; in round k each jittered sample applies the k-th op of its own order (``on``: ``[B, 4]``
        which components each sample's view has). Brightness, contrast and saturation are each
        ``clamp(x * f + base * (1 - f))`` with base 0, the grey mean or the grey image (kornia's formulas, the
        same float operations), so one blend per round serves them all, a factor of 1 leaving the other samples
        exactly as they are; hue runs on its own samples."""
        rows = torch.arange(x.shape[0])
        for k in range(4):
            op = d.order[:, k]
            active = d.jitter & on[rows, op]
            blend = active & (op < 3)
            if blend.any():
                factor = torch.where(blend, d.factors[rows, op.clamp(max=2)], 1.0)
                f = _tensor_factor(factor, x).view(-1, 1, 1, 1)
                gray = rgb_to_grayscale(x)
                contrast = _tensor_factor(blend & (op == 1), x).view(-1, 1, 1, 1)
                saturation = _tensor_factor(blend & (op == 2), x).view(-1, 1, 1, 1)
                base = gray * saturation + gray.mean((-2, -1), True) * contrast
                x = (x * f + base * (1 - f)).clamp_(0.0, 1.0)
            x = _apply_where(x, active & (op == 3),
                             lambda y, r: adjust_hue(y, _tensor_factor(d.factors[r, 3] * (2 * math.pi), y)))
        return x

    def _apply_draws(self, x: torch.Tensor, d: ViewDraw, on: torch.Tensor, cropped: bool = False) -> torch.Tensor:
        """Views of ``x`` (float ``[B, 3, H, W]`` in [0, 1]) with the drawn parameters ``d``, normalised. A sample's
        result depends on its own row only, so both views of a batch go through at once (half the small ops).
        ``cropped``: ``x`` holds each view's crop already (cut by the workers), only the flip is left of that step."""
        if cropped:
            out = _apply_where(x, d.flip, lambda y, r: y.flip(-1))
        else:
            out = resized_crop(x, d.box, d.flip, self.size)
        out = self._jitter(out, d, on)
        w = self.gray_weights.to(out.device)
        out = _apply_where(out, d.gray, lambda y, r: rgb_to_grayscale(y, rgb_weights=w).expand_as(y))
        ks = self.kernel_size
        out = _apply_where(out, d.blur, lambda y, r: gaussian_blur2d(
            y, (ks, ks), d.sigma[r].to(torch.float32)[:, None].expand(-1, 2).contiguous(), "reflect"))
        # kornia's solarize(y, 0.5), without the copy of its threshold to the device at every call
        out = _apply_where(out, d.solarize, lambda y, r: torch.where(y < 0.5, y, 1.0 - y))
        return normalize(out, self.mean, self.std)

    def apply_view(self, x: torch.Tensor, p: AugmentationParams, d: ViewDraw) -> torch.Tensor:
        """One view of ``x`` (float ``[B, 3, H, W]`` in [0, 1]) with the parameters ``d`` drawn for ``p``,
        normalised. Ops whose probability in ``p`` is 0 are drawn as never applied."""
        return self._apply_draws(x, d, _components(p).expand(x.shape[0], 4))

    def forward(self, images: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of ``images``: whole images ``[B, 3, H, W]`` (cropped here), or each view's crop made by the
        workers, ``[B, 2, 3, size, size]`` (:class:`synco.data.crops.ViewCrops` with the same seeds)."""
        cropped = images.ndim == 5
        if not (images.ndim == 4 and images.shape[1] == 3
                or cropped and images.shape[1:] == (2, 3, self.size, self.size)):
            raise SyncoError(f"BatchViews expects [B, 3, H, W] images or [B, 2, 3, {self.size}, {self.size}] crops, "
                             f"got shape {tuple(images.shape)}.")
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
        if seeds.numel() != images.shape[0]:
            raise SyncoError(f"BatchViews needs one seed per image: {seeds.numel()} seeds for {images.shape[0]} "
                             f"images.")
        x = images.to(torch.float32)
        if images.dtype == torch.uint8:
            x = x.div_(255.0)
        B, H, W = x.shape[0], *x.shape[-2:]
        draws = self.draw(seeds, H, W)
        both = ViewDraw(*(torch.cat([getattr(d, f.name) for d in draws]) for f in dataclasses.fields(ViewDraw)))
        on = torch.cat([_components(p).expand(B, 4) for p in self.views])
        x = torch.cat([x[:, 0], x[:, 1]]) if cropped else torch.cat([x, x])
        out = self._apply_draws(x, both, on, cropped)
        return out[:B], out[B:]
