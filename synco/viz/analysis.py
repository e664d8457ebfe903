"""What one checkpoint's attention and gradients show on a batch of images: the maps of every view and
their numbers (attention entropy, share of the map inside the foreground mask).

Views: ``cls`` ([CLS]-to-patch attention of one block, mean over heads), ``threshold`` (the patches holding
the top fraction of that mass), ``patch`` (attention each patch receives from the others), ``heads``
(``cls`` per head), ``gradcam`` and ``saliency`` (any backbone). The attention views need a ViT/DeiT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import SyncoError

ATTENTION_VIEWS = ("cls", "threshold", "patch", "heads")
GRADIENT_VIEWS = ("gradcam", "saliency")
ALL_VIEWS = ATTENTION_VIEWS + GRADIENT_VIEWS
DEFAULT_VIEWS = ("cls", "threshold", "patch", "gradcam", "saliency")


def parse_views(spec: str) -> Optional[tuple[str, ...]]:
    """None for auto; else the asked views in canonical order."""
    spec = spec.strip().lower()
    if spec == "auto":
        return None
    if spec == "all":
        return ALL_VIEWS
    asked = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in asked if v not in ALL_VIEWS]
    if unknown or not asked:
        raise SyncoError(f"views: unknown view(s) {', '.join(unknown) or '(none)'}; choose from auto, all or a comma "
                         f"list of {', '.join(ALL_VIEWS)}.")
    return tuple(v for v in ALL_VIEWS if v in asked)


def rounded(x, nd: int = 4):
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, list):
        return [rounded(v, nd) for v in x]
    return round(float(x), nd)


def analyse_checkpoint(model, x, fg, views: Optional[tuple[str, ...]], *, block: int = -1, threshold: float = 0.6,
                       head=None) -> dict:
    """Maps (numpy, for the figures), per-cell notes and metrics (JSON) of one backbone.

    Args:
        model: the backbone, in eval mode.
        x: images [B, 3, H, W], normalised as the model takes them.
        fg: foreground masks [B, H, W] for the mass-in-mask numbers.
        views: the views to compute (None: :data:`DEFAULT_VIEWS`).
        block: the transformer block whose attention is read.
        threshold: the fraction of [CLS] attention mass the thresholded view keeps.
        head: a linear head; its predicted class is the target of the gradient views.

    Returns:
        ``{"maps": {view: array [B, H, W] ([B, heads, H, W] for heads)}, "notes": {view: per-image strings},
        "metrics": JSON-ready numbers, per image under "per_image"}``.
    """
    from .attention import has_global_attention, vit_attention
    from .metrics import max_entropy

    attention_ok = has_global_attention(model)
    want = views or DEFAULT_VIEWS
    found = _Found(metrics={"attention": attention_ok})
    if attention_ok and any(v in want for v in ATTENTION_VIEWS):
        am = vit_attention(model, x, block=block)
        n = am.grid[0] * am.grid[1]
        h_max = max_entropy(n)
        found.metrics.update(num_patches=n, grid=list(am.grid), max_entropy=rounded(h_max))
        if am.cls_heads is not None:
            _cls_views(am, fg, threshold, n, h_max, found)
        _patch_views(am, fg, h_max, found)
    _gradient_views(model, x, fg, want, head, found)
    per_image = found.per_image
    found.metrics["per_image"] = [{k: (int(v[i]) if k in ("predicted_class", "threshold_patches") else rounded(v[i]))
                                   for k, v in per_image.items()} for i in range(x.shape[0])]
    maps = {k: v.detach().cpu().numpy() for k, v in found.maps.items() if v is not None}
    return {"maps": maps, "notes": found.notes, "metrics": found.metrics}


@dataclass
class _Found:
    """What the views of one checkpoint found, filled view by view."""

    maps: dict = field(default_factory=dict)  # view -> tensor [B, H, W] ([B, heads, H, W] for heads)
    notes: dict = field(default_factory=dict)  # view -> one string per image
    metrics: dict = field(default_factory=dict)  # JSON-ready, over the images
    per_image: dict = field(default_factory=dict)  # name -> tensor [B] or [B, heads]


def _cls_views(am, fg, threshold: float, n: int, h_max: float, found: _Found) -> None:
    """[CLS] attention: its map (mean over heads), the thresholded map, one map per head."""
    from .attention import threshold_mass, upsample
    from .metrics import attention_entropy, mask_fraction

    ent = attention_entropy(am.cls_heads)  # [B, heads]
    ent_mean_map = attention_entropy(am.cls)  # [B], entropy of the head-averaged map (the one shown)
    kept = threshold_mass(am.cls, threshold).flatten(1).sum(1)
    found.metrics.update(cls_entropy_per_head=rounded(ent.mean(0)), cls_entropy_mean=rounded(ent.mean()),
                         cls_entropy_normalized=rounded(ent.mean() / h_max),
                         cls_entropy_of_head_mean=rounded(ent_mean_map.mean()),
                         cls_mask_fraction=rounded(mask_fraction(am.cls, fg).mean()),
                         threshold_patches_mean=rounded(kept.float().mean()))
    found.per_image.update(cls_entropy_per_head=ent, cls_entropy_of_head_mean=ent_mean_map,
                           cls_mask_fraction=mask_fraction(am.cls, fg), threshold_patches=kept)
    found.maps.update(cls=am.cls_image(), threshold=am.cls_threshold(threshold),
                      heads=upsample(am.cls_heads, am.image_size))  # [B, heads, H, W]
    found.notes["cls"] = [f"H={h:.3f}/{h_max:.3f}" for h in ent_mean_map.tolist()]
    found.notes["threshold"] = [f"{k}/{n} patches" for k in kept.tolist()]
    found.notes["heads"] = [[f"H={h:.3f}" for h in row] for row in ent.tolist()]


def _patch_views(am, fg, h_max: float, found: _Found) -> None:
    """The attention each patch receives from the other patches ([CLS] excluded)."""
    from .metrics import attention_entropy, mask_fraction, row_entropy

    rows = row_entropy(am.attn, am.num_prefix)  # [B, heads]
    ent_patch = attention_entropy(am.patch)
    found.metrics.update(patch_row_entropy_per_head=rounded(rows.mean(0)),
                         patch_row_entropy_mean=rounded(rows.mean()),
                         patch_entropy_of_head_mean=rounded(ent_patch.mean()),
                         patch_mask_fraction=rounded(mask_fraction(am.patch, fg).mean()))
    found.per_image.update(patch_row_entropy_per_head=rows, patch_entropy_of_head_mean=ent_patch,
                           patch_mask_fraction=mask_fraction(am.patch, fg))
    found.maps["patch"] = am.patch_image()
    found.notes["patch"] = [f"H={h:.3f}/{h_max:.3f}" for h in ent_patch.tolist()]


def _gradient_views(model, x, fg, want: tuple, head, found: _Found) -> None:
    """Grad-CAM and gradient saliency of the head's predicted-class logit (without a head: of the feature norm)."""
    from .metrics import mask_fraction
    from .saliency import grad_cam, gradient_saliency

    pred = None
    for view, fn in (("gradcam", grad_cam), ("saliency", gradient_saliency)):
        if view in want:
            m, pred = fn(model, x, head=head, return_classes=True)
            frac = mask_fraction(m, fg)
            found.maps[view] = m
            found.metrics[f"{view}_mask_fraction"] = rounded(frac.mean())
            found.per_image[f"{view}_mask_fraction"] = frac
            found.notes[view] = [f"in mask {f:.2f}" for f in frac.tolist()]
    if pred is not None:
        found.per_image["predicted_class"] = pred
