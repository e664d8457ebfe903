"""Numbers that go with the maps: attention entropy and the share of a map's mass inside a foreground mask.

* Entropy (nats) of an attention distribution ``p`` over ``N`` patches: ``-sum p log p``; 0 when all mass
  is on one patch, ``log N`` when uniform. Lower = more focused. ``normalized`` divides by ``log N`` so grids
  of different sizes compare.
* Mask fraction: ``sum(map * mask) / sum(map)`` for a non-negative map; the chance level is the mask's area
  fraction (a map spread uniformly scores exactly that). When the mask is finer than the map (a patch grid),
  the mask is area-averaged onto the grid, so a patch half inside counts half.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import SyncoError


def entropy(p: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """Shannon entropy (nats) of distributions along ``dim`` (renormalised first; 0 log 0 = 0)."""
    p = p.float().clamp_min(0)
    p = p / p.sum(dim=dim, keepdim=True).clamp_min(1e-30)
    return -(torch.special.xlogy(p, p)).sum(dim=dim)


def attention_entropy(grid_maps: torch.Tensor) -> torch.Tensor:
    """Entropy of each map [..., gh, gw] over its grid cells -> [...] (e.g. [B, heads])."""
    return entropy(grid_maps, dim=(-2, -1))


def row_entropy(attn: torch.Tensor, num_prefix: int = 0) -> torch.Tensor:
    """Mean entropy over patch queries of their attention to patch keys, per head: [B, heads, N, N] -> [B, heads]."""
    pp = attn[:, :, num_prefix:, num_prefix:]
    return entropy(pp, dim=-1).mean(dim=-1)


def max_entropy(num_cells: int) -> float:
    return math.log(num_cells)


def _mask_on(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Float mask [..., h, w] brought to ``shape``: area average when shrinking, nearest when growing."""
    m = mask.float()
    if tuple(m.shape[-2:]) == tuple(shape):
        return m
    lead = m.shape[:-2]
    flat = m.reshape(-1, 1, *m.shape[-2:])
    if m.shape[-2] >= shape[0] and m.shape[-1] >= shape[1]:
        out = F.adaptive_avg_pool2d(flat, shape)
    else:
        out = F.interpolate(flat, size=shape, mode="nearest")
    return out.reshape(*lead, *shape)


def mask_fraction(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each non-negative map's mass [..., h, w] inside ``mask`` (bool/float [..., H, W], broadcast)."""
    if maps.ndim < 2 or mask.ndim < 2:
        raise SyncoError("mask_fraction needs 2-D maps and masks.")
    m = maps.float().clamp_min(0)
    weights = _mask_on(mask, tuple(m.shape[-2:])).to(m.device)
    total = m.sum(dim=(-2, -1))
    inside = (m * weights).sum(dim=(-2, -1))
    return inside / total.clamp_min(1e-30)


def centre_box_mask(height: int, width: int, fraction: float = 0.5) -> torch.Tensor:
    """A boolean [H, W] box centred in the image whose sides are ``fraction`` of the image's sides."""
    if not 0.0 < fraction <= 1.0:
        raise SyncoError(f"mask_box must be in (0, 1], got {fraction}.")
    bh, bw = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - bh) // 2, (width - bw) // 2
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:top + bh, left:left + bw] = True
    return mask
