"""ViT/DeiT attention maps of the last block (the papers' Figure 1 and Figures 6-10, DINO protocol).

timm computes attention with a fused kernel that never materialises the weights, so we capture what
the attention module receives (a forward pre-hook on ``blocks[i].attn``) and rebuild the weights from
the module's own projections: ``softmax(q k^T * scale)`` per head, with ``q_norm``/``k_norm`` applied
when the module has them. Nothing of the model is patched or copied.

Conventions for every map returned here:

* a map "over patches" is a probability distribution on the patch grid (it sums to 1), shaped
  ``[..., gh, gw]``; prefix tokens ([CLS] and register tokens, ``model.num_prefix_tokens``) are never part
  of the grid;
* ``upsample`` brings a grid to image resolution (bilinear) and rescales it to [0, 1] for display;
* ``threshold_mass`` keeps the smallest set of top patches holding a given fraction of the mass (DINO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SyncoError

# ---------------------------------------------------------------------------------------------
# Which models have inspectable global attention


def attention_blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The transformer blocks of a ViT-like model (each with an ``attn`` module), or None (e.g. Swin)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0 or not hasattr(blocks[-1], "attn"):
        return None
    if not hasattr(model, "patch_embed"):
        return None
    return blocks


def has_global_attention(model: nn.Module) -> bool:
    """True for ViT/DeiT-style models whose last block attends over all tokens (not Swin windows)."""
    blocks = attention_blocks(model)
    if blocks is None:
        return False
    attn = blocks[-1].attn
    has_proj = hasattr(attn, "qkv") or all(hasattr(attn, n) for n in ("q_proj", "k_proj")) \
        or all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q", "k"))
    return has_proj and hasattr(attn, "num_heads")


def num_prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))


def has_class_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def patch_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Patch grid (gh, gw) of an input of ``height x width`` pixels."""
    patch = model.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return height // ph, width // pw


# ---------------------------------------------------------------------------------------------
# Recomputing the attention weights from the module's projections


def _query_key(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head queries and keys [B, heads, N, head_dim] for the tokens ``x`` [B, N, C] entering ``attn``."""
    B, N, _ = x.shape
    heads = int(attn.num_heads)
    if hasattr(attn, "qkv"):
        bias = attn.qkv.bias
        q_bias, v_bias = getattr(attn, "q_bias", None), getattr(attn, "v_bias", None)
        if bias is None and q_bias is not None:  # BEiT-style: separate q/v biases, no k bias
            zeros = torch.zeros_like(q_bias)
            bias = torch.cat([q_bias, zeros, v_bias if v_bias is not None else zeros])
        qkv = F.linear(x, attn.qkv.weight, bias)
        q, k, _ = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q_lin = attn.q_proj if hasattr(attn, "q_proj") else attn.q
        k_lin = attn.k_proj if hasattr(attn, "k_proj") else attn.k
        q = q_lin(x).reshape(B, N, heads, -1).transpose(1, 2)
        k = k_lin(x).reshape(B, N, heads, -1).transpose(1, 2)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T * scale)`` [B, heads, N, N] of attention module ``attn`` on its input tokens ``x``."""
    q, k = _query_key(attn, x)
    scale = getattr(attn, "scale", None)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-2, -1)
    return logits.float().softmax(dim=-1)


@torch.no_grad()
def capture_attention(model: nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """Attention weights [B, heads, N, N] (rows = queries, sum to 1) of ``model.blocks[block]`` on ``images``.

    Tokens are ordered as in the model: ``num_prefix_tokens(model)`` prefix tokens, then the patches in
    row-major order."""
    blocks = attention_blocks(model)
    if blocks is None or not has_global_attention(model):
        raise SyncoError(f"{type(model).__name__} has no global self-attention blocks to read attention from "
                         "(a ViT/DeiT is needed; for Swin use Grad-CAM or gradient saliency).")
    depth = len(blocks)
    if isinstance(block, bool) or not isinstance(block, int) or not -depth <= block < depth:
        raise SyncoError(f"option 'block': {block!r} is not a block of this {depth}-block model; give an integer "
                         f"from 0 to {depth - 1} (or from -{depth} to -1, counted from the last; -1 is the last).")
    attn = blocks[block].attn
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        captured.append(x.detach())

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(images)
    finally:
        handle.remove()
    if not captured:
        raise SyncoError(f"the attention module of block {block} was not called during the forward pass.")
    return attention_weights(attn, captured[-1])


# ---------------------------------------------------------------------------------------------
# Maps from attention weights


def _normalise(m: torch.Tensor) -> torch.Tensor:
    """Rescale so the last two dims (a grid) sum to 1."""
    total = m.sum(dim=(-2, -1), keepdim=True)
    return m / total.clamp_min(torch.finfo(m.dtype).tiny)


def cls_attention(attn: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """[CLS]-to-patch attention per head [B, heads, gh, gw], each head renormalised over the patches."""
    gh, gw = grid
    rows = attn[:, :, 0, num_prefix:]
    if rows.shape[-1] != gh * gw:
        raise SyncoError(f"attention has {rows.shape[-1]} patch tokens but the grid is {gh}x{gw}.")
    return _normalise(rows.reshape(*rows.shape[:2], gh, gw))


def patch_attention(attn: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Attention each patch receives from the other patches, per head [B, heads, gh, gw].

    Only patch-to-patch weights are used ([CLS] and register tokens excluded as queries and keys), the
    diagonal (a patch attending to itself) is left out, and each head's map is renormalised to sum to 1."""
    gh, gw = grid
    pp = attn[:, :, num_prefix:, num_prefix:]
    n = pp.shape[-1]
    if n != gh * gw:
        raise SyncoError(f"attention has {n} patch tokens but the grid is {gh}x{gw}.")
    off_diag = pp * (1 - torch.eye(n, dtype=pp.dtype, device=pp.device))
    received = off_diag.sum(dim=-2) / max(n - 1, 1)  # mean over the other query patches
    return _normalise(received.reshape(*received.shape[:2], gh, gw))


def upsample(grid_map: torch.Tensor, size: tuple[int, int] | int, rescale: bool = True) -> torch.Tensor:
    """Bilinear upsampling of [..., gh, gw] to [..., H, W]; with ``rescale`` each map is mapped to [0, 1]."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    lead = grid_map.shape[:-2]
    flat = grid_map.reshape(-1, 1, *grid_map.shape[-2:]).float()
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)
    return minmax(up) if rescale else up


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Map each [..., H, W] map to [0, 1] (a constant map becomes all zeros)."""
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def threshold_mass(m: torch.Tensor, fraction: float = 0.6) -> torch.Tensor:
    """Boolean mask [..., H, W] of the smallest set of highest values holding >= ``fraction`` of the mass.

    DINO's thresholded attention: sort the values, keep them from the top until their cumulative share of
    the total reaches ``fraction``. Works on grids (exact) and on upsampled maps."""
    if not 0.0 < fraction <= 1.0:
        raise SyncoError(f"threshold fraction must be in (0, 1], got {fraction}.")
    shape = m.shape
    flat = m.reshape(-1, shape[-2] * shape[-1]).float().clamp_min(0)
    vals, idx = flat.sort(dim=-1, descending=True)
    cum = vals.cumsum(dim=-1) / vals.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # mass strictly above each value
    keep_sorted = before < fraction - 1e-6
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return keep.reshape(shape)


@dataclass
class AttentionMaps:
    """Last-block attention of a batch. Grids are distributions over patches (sum to 1)."""

    attn: torch.Tensor  # [B, heads, N, N] raw weights, tokens = prefix + patches
    cls_heads: Optional[torch.Tensor]  # [B, heads, gh, gw] ([CLS] rows; None without a class token)
    patch_heads: torch.Tensor  # [B, heads, gh, gw]
    num_prefix: int
    grid: tuple[int, int]
    image_size: tuple[int, int]

    @property
    def cls(self) -> Optional[torch.Tensor]:
        """[CLS] attention averaged over heads [B, gh, gw] (sums to 1)."""
        return None if self.cls_heads is None else self.cls_heads.mean(dim=1)

    @property
    def patch(self) -> torch.Tensor:
        """Patch self-attention averaged over heads [B, gh, gw] (sums to 1)."""
        return self.patch_heads.mean(dim=1)

    def cls_image(self) -> Optional[torch.Tensor]:
        """[CLS] attention bilinearly upsampled to the image [B, H, W], in [0, 1]."""
        return None if self.cls is None else upsample(self.cls, self.image_size)

    def patch_image(self) -> torch.Tensor:
        return upsample(self.patch, self.image_size)

    def cls_threshold(self, fraction: float = 0.6) -> Optional[torch.Tensor]:
        """Top-``fraction``-mass patches of the mean [CLS] attention, at image size [B, H, W] (bool)."""
        if self.cls is None:
            return None
        keep = threshold_mass(self.cls, fraction).float().unsqueeze(1)
        return F.interpolate(keep, size=self.image_size, mode="nearest").squeeze(1).bool()


def vit_attention(model: nn.Module, images: torch.Tensor, block: int = -1) -> AttentionMaps:
    """[CLS] and patch self-attention maps of ``model`` (a timm ViT/DeiT) on normalised ``images`` [B, 3, H, W]."""
    attn = capture_attention(model, images, block)
    prefix = num_prefix_tokens(model)
    grid = patch_grid(model, images.shape[-2], images.shape[-1])
    cls_heads = cls_attention(attn, prefix, grid) if has_class_token(model) and prefix > 0 else None
    return AttentionMaps(attn=attn, cls_heads=cls_heads, patch_heads=patch_attention(attn, prefix, grid),
                         num_prefix=prefix, grid=grid, image_size=tuple(images.shape[-2:]))
