"""Checkpoints side by side: every view of every checkpoint on the same images, one PNG per view (one row
per image, one column per checkpoint: the papers' Figures 1 and 6-15) and ``metrics.json``.

The heavy imports (torch, timm, matplotlib) wait inside the functions: every `synco` command builds its
parser, and the parser imports this module for :class:`VizOptions`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import SyncoError
from ..options import SEED_RANGE, check_options, opt
from .analysis import ALL_VIEWS, DEFAULT_VIEWS, analyse_checkpoint, parse_views, rounded


@dataclass
class VizOptions:
    views: str = "auto"  # auto (every applicable view but heads) | all | comma list of ALL_VIEWS (parse_views)
    threshold: float = opt(0.6, gt=0, le=1)  # fraction of [CLS] attention mass kept by the thresholded view
    # default foreground: centred box, sides = this fraction of the image's
    mask_box: float = opt(0.5, gt=0, le=1)
    block: int = -1  # transformer block whose attention is read (negative: from the last)
    # the first N images (0 would read as "no limit")
    max_images: Optional[int] = opt(None, ge=1, why="or null for all")
    alpha: float = opt(0.5, ge=0, le=1)  # heat-map opacity over the image
    cmap: str = "jet"
    dpi: int = opt(100, ge=10, le=1200)  # a figure is several images wide: 1200 dpi is already hundreds of MB
    device: str = "auto"
    seed: int = opt(0, **SEED_RANGE)  # initialisation of --checkpoint random
    backbone: Optional[str] = None  # timm name or synco preset (cpu-demo) for --checkpoint random
    backbone_kwargs: dict = field(default_factory=dict)


def _label(checkpoint: str, meta: dict) -> str:
    if checkpoint == "random":
        return "random init"
    p = Path(checkpoint)
    run_dir = p if p.is_dir() else p.parent
    method = meta.get("method")
    if method is None and (run_dir / "config.yaml").is_file():
        import yaml

        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            method = saved.get("method") if isinstance(saved, dict) else None
        except (yaml.YAMLError, ValueError, OSError):  # a damaged config only costs the label its method
            method = None
    epoch = meta.get("epoch")
    name = run_dir.name or str(run_dir)
    parts = [str(method) if method else name]
    extra = ([name] if method else []) + ([f"{epoch} ep"] if isinstance(epoch, int) else [])
    return parts[0] + (f" ({', '.join(extra)})" if extra else "")


def _check_cmap(name: str) -> None:
    """The colour map is matplotlib's to name: asked here, before any checkpoint is loaded."""
    import matplotlib

    if name not in matplotlib.colormaps:
        raise SyncoError(f"option 'cmap': '{name}' is not a matplotlib colour map (e.g. jet, viridis, magma, "
                         "inferno).")


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} #{seen[lab]}")
    return out


def _per_checkpoint(values: Optional[list[str]], n: int, what: str) -> list[Optional[str]]:
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise SyncoError(f"give {what} once for all checkpoints or once per checkpoint ({n}); got {len(values)}.")
    return list(values)


def visualize(checkpoints: list[str], out: Path, opts: VizOptions, images: Optional[str] = None,
              mask: Optional[str] = None, linear_heads: Optional[list[str]] = None,
              labels: Optional[list[str]] = None) -> dict:
    """Run every view for every checkpoint, write the PNGs and ``metrics.json``; returns the JSON dict."""
    from ..device import resolve_device
    from ..io import atomic_write_text
    from .images import load_images

    check_options(opts)  # also when called as a library, without the command line
    _check_cmap(opts.cmap)
    views = parse_views(opts.views)
    if labels and len(labels) != len(checkpoints):
        raise SyncoError(f"give --label once per checkpoint ({len(checkpoints)}); got {len(labels)}.")
    heads = _per_checkpoint(linear_heads, len(checkpoints), "--linear-head")
    device = resolve_device(opts.device)
    photos = load_images(images, opts.max_images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # -- every view of every checkpoint, on the same images
    results, inputs = _analyse_checkpoints(checkpoints, heads, labels, photos, mask, views, opts, device)

    # -- one figure per view: a row per image, a column per checkpoint
    names = [p.name for p in photos]
    written = _write_figures(out, results, views, inputs.display, names, opts)

    report = {
        "images": names, "image_size": inputs.size, "mask": inputs.mask_desc,
        "mask_area_fraction": rounded(inputs.fg.float().mean(dim=(-2, -1)).mean()),
        "threshold": opts.threshold, "views": list(written), "figures": written,
        "entropy_units": "nats (max = log(num_patches))",
        "checkpoints": [{"label": r["label"], **r["meta"], **r["metrics"]} for r in results],
        "options": asdict(opts),
    }
    atomic_write_text(json.dumps(report, indent=2), out / "metrics.json")
    return report


@dataclass
class _Inputs:
    """The images as every checkpoint of one figure takes them (the first checkpoint's input size)."""

    size: int
    x: object  # [B, 3, size, size], normalised, on the CPU
    fg: object  # foreground masks [B, size, size]
    mask_desc: str
    display: object  # the images as shown under the maps


def _model_inputs(photos: list, size: int, mask: Optional[str], mask_box: float) -> _Inputs:
    from .images import denormalize, load_masks, masks_to_model_geometry, to_model_input
    from .metrics import centre_box_mask

    x = to_model_input(photos, size)
    if mask:
        fg = masks_to_model_geometry(load_masks(mask, photos), size)
        mask_desc = str(mask)
    else:
        fg = centre_box_mask(size, size, mask_box).expand(len(photos), size, size)
        mask_desc = f"centre box, sides {mask_box} of the image"
    return _Inputs(size, x, fg, mask_desc, denormalize(x))


def _analyse_checkpoints(checkpoints: list[str], heads: list, labels: Optional[list[str]], photos: list,
                         mask: Optional[str], views, opts: VizOptions, device) -> tuple[list[dict], _Inputs]:
    """Each checkpoint's maps, notes, metrics, label and metadata, one model in memory at a time."""
    from ..eval.common import load_eval_backbone
    from ..eval.head import load_head
    from ..models.backbone import input_size

    results, inputs = [], None
    for i, ckpt in enumerate(checkpoints):
        model, meta = load_eval_backbone(ckpt, opts, device)
        s = input_size(model)
        if inputs is None:
            inputs = _model_inputs(photos, s, mask, opts.mask_box)
        elif s != inputs.size:
            raise SyncoError(f"checkpoint '{ckpt}' takes {s}px inputs but the first one takes {inputs.size}px: "
                             "compare backbones with the same input size in one figure.")
        head = None
        if heads[i] and heads[i].lower() != "none":
            head, _ = load_head(heads[i], expect_dim=meta["num_features"])
            head = head.to(device)
        r = analyse_checkpoint(model, inputs.x.to(device), inputs.fg.to(device), views, block=opts.block,
                               threshold=opts.threshold, head=head)
        r["label"] = labels[i] if labels else _label(ckpt, meta)
        r["meta"] = {k: meta.get(k) for k in ("backbone", "backbone_kwargs", "method", "epoch", "source")}
        r["meta"]["linear_head"] = heads[i]
        results.append(r)
        del model
    for r, lab in zip(results, _unique([r["label"] for r in results])):
        r["label"] = lab
    return results, inputs


FIGURE_NAMES = {"cls": "cls_attention", "patch": "patch_attention", "threshold": "cls_threshold",
                "heads": "cls_heads"}


def _write_figures(out: Path, results: list[dict], views, display, names: list[str], opts: VizOptions) -> dict:
    """view -> the PNG written for it, for every view asked for that some checkpoint has."""
    from .figure import HEAT, MASK, Column, grid_figure

    titles = {
        "cls": "[CLS] attention, last block, mean over heads",
        "threshold": f"[CLS] attention: patches holding {opts.threshold:.0%} of the mass",
        "patch": "patch self-attention (received from other patches, [CLS] excluded)",
        "gradcam": "Grad-CAM, last feature map", "saliency": "gradient saliency |dy/dx|",
        "heads": "[CLS] attention per head, last block",
    }
    present = [v for v in ALL_VIEWS if any(v in r["maps"] for r in results)]
    written = {}
    for view in (v for v in present if v in (views or DEFAULT_VIEWS)):
        if view == "heads":
            cols = _head_columns(results)
        else:
            cols = [Column(r["label"], r["maps"].get(view), notes=r["notes"].get(view)) for r in results]
        path = grid_figure(out / f"{FIGURE_NAMES.get(view, view)}.png", display, cols, names,
                           kind=MASK if view == "threshold" else HEAT, alpha=opts.alpha, cmap=opts.cmap,
                           dpi=opts.dpi, title=titles[view])
        written[view] = str(path)
    return written


def _head_columns(results: list[dict]) -> list:
    """One column per head of each checkpoint (a blank one for a checkpoint without attention heads)."""
    from .figure import Column

    cols = []
    for r in results:
        hm = r["maps"].get("heads")
        if hm is None:
            cols.append(Column(r["label"], None))
            continue
        hn = r["notes"].get("heads")
        cols += [Column(f"{r['label']} h{h}", hm[:, h], notes=[row[h] for row in hn] if hn else None)
                 for h in range(hm.shape[1])]
    return cols
