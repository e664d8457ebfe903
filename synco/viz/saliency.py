"""Gradient-based maps for any backbone (the papers' Swin Figures 11-15): Grad-CAM and gradient saliency.

The score ``y_c`` whose gradient is taken is the predicted class logit of a linear head when one is given
(``synco eval linear`` writes it), else the norm of the backbone's pooled feature (a self-supervised
backbone has no classes; the feature norm asks "what makes the representation respond").

Grad-CAM's feature map is the last one before pooling:

* Swin (and other models whose ``forward_features`` returns a 4-D map): that output, i.e. timm Swin's
  final ``norm`` output, laid out NHWC (NCHW maps of convnets are recognised too);
* ViT/DeiT: ``forward_features`` returns tokens after the final norm, and with [CLS] pooling the patch
  tokens there get no gradient, so the map is the token input of the last block's attention
  (``blocks[-1].norm1`` output), patch tokens only, reshaped to the patch grid.

All maps are returned as [B, H, W] at the input resolution, each rescaled to [0, 1].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SyncoError
from .attention import attention_blocks, num_prefix_tokens, patch_grid


def target_scores(features: torch.Tensor,
                  head: Optional[nn.Module] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(scores [B], predicted classes [B] or None): the predicted-class logit of ``head``, else ``||f||``."""
    if head is None:
        return features.float().norm(dim=-1), None
    logits = head(features)
    pred = logits.argmax(dim=-1)
    return logits.gather(1, pred[:, None]).squeeze(1), pred


def _to_nchw(fmap: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A 4-D feature map as [B, C, h, w] (timm Swin gives NHWC)."""
    fmt = getattr(model, "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)  # timm Format enum or string
    if fmt == "NHWC":
        return fmap.permute(0, 3, 1, 2)
    if fmt == "NCHW":
        return fmap
    c = getattr(model, "num_features", None)
    if fmap.shape[-1] == c and fmap.shape[1] != c:
        return fmap.permute(0, 3, 1, 2)
    return fmap


def _forward_with_feature_map(model: nn.Module, images: torch.Tensor):
    """(pooled features [B, D], activation in the autograd graph, function activation -> [B, C, h, w])."""
    blocks = attention_blocks(model)
    if blocks is not None and hasattr(blocks[-1], "norm1"):
        captured: list[torch.Tensor] = []
        handle = blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            features = model(images)
        finally:
            handle.remove()
        prefix = num_prefix_tokens(model)
        gh, gw = patch_grid(model, images.shape[-2], images.shape[-1])
        if captured[-1].shape[1] - prefix != gh * gw:
            raise SyncoError(f"cannot arrange {captured[-1].shape[1] - prefix} tokens on a {gh}x{gw} patch grid.")

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return t[:, prefix:].reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2)

        return features, captured[-1], to_map
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise SyncoError(f"{type(model).__name__} has no forward_features/forward_head: Grad-CAM needs a timm model.")
    fmap = model.forward_features(images)
    if fmap.ndim != 4:
        raise SyncoError(f"{type(model).__name__}.forward_features returns a {fmap.ndim}-D tensor; Grad-CAM "
                         "needs a spatial feature map (Swin, convnets) or ViT blocks.")
    features = model.forward_head(fmap)
    return features, fmap, lambda t: _to_nchw(t, model)


def _input(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    p = next(model.parameters(), None)
    x = images.detach().to(p.device if p is not None else images.device).clone()
    return x.requires_grad_(True)


def grad_cam(model: nn.Module, images: torch.Tensor, head: Optional[nn.Module] = None,
             return_classes: bool = False):
    """Grad-CAM [B, H, W] in [0, 1]: ``relu(sum_c mean_hw(dy/dA_c) * A_c)`` on the last feature map,
    bilinearly upsampled to the input. With ``return_classes`` also the predicted classes (or None)."""
    x = _input(images, model)
    with torch.enable_grad():
        features, act, to_map = _forward_with_feature_map(model, x)
        scores, pred = target_scores(features, head)
        (grads,) = torch.autograd.grad(scores.sum(), act)
    fmap, grads = to_map(act.detach()), to_map(grads)
    weights = grads.mean(dim=(-2, -1), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1)).detach().float()
    cam = F.interpolate(cam[:, None], size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (cam, pred) if return_classes else cam


def gradient_saliency(model: nn.Module, images: torch.Tensor, head: Optional[nn.Module] = None,
                      return_classes: bool = False):
    """|dy_c/dx| averaged over colour channels, [B, H, W], each map divided by its maximum (in [0, 1])."""
    x = _input(images, model)
    with torch.enable_grad():
        scores, pred = target_scores(model(x), head)
        (grads,) = torch.autograd.grad(scores.sum(), x)
    sal = grads.abs().mean(dim=1).float()
    sal = sal / sal.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (sal, pred) if return_classes else sal

