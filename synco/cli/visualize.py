"""`synco visualize --checkpoint A [--checkpoint B ...] [--images PATH_OR_FOLDER] [--out DIR] [key=value ...]`

Writes one PNG per view, one row per image and one column per checkpoint (the papers' Figures 1 and
6-15), and ``metrics.json`` with attention entropy and mass-in-mask numbers. Views:

* ``cls``       [CLS]-to-patch attention of the last block, mean over heads, heat map (ViT/DeiT)
* ``threshold`` the patches holding the top ``threshold`` fraction of that attention mass (DINO style)
* ``patch``     attention each patch receives from the other patches, [CLS] excluded (ViT/DeiT)
* ``heads``     ``cls`` for every head separately
* ``gradcam``   Grad-CAM on the last feature map before pooling (any backbone; the Swin view)
* ``saliency``  |dy_c/dx| averaged over colour channels (any backbone)

``y_c`` is the predicted class of ``--linear-head`` when given, else the pooled feature's norm.
Foreground for the mass-in-mask numbers: ``--mask`` (one mask image, or a folder of masks named like the
images), else a centred box with sides ``mask_box`` of the image (default 0.5: the central quarter of
the area; a rough stand-in for "the object" in centred photos, and its chance level is reported).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..config import apply_overrides
from ..errors import SyncoError

ATTENTION_VIEWS = ("cls", "threshold", "patch", "heads")
GRADIENT_VIEWS = ("gradcam", "saliency")
ALL_VIEWS = ATTENTION_VIEWS + GRADIENT_VIEWS
DEFAULT_VIEWS = ("cls", "threshold", "patch", "gradcam", "saliency")


@dataclass
class VizOptions:
    views: str = "auto"  # auto (every applicable view but heads) | all | comma list of ALL_VIEWS
    threshold: float = 0.6  # fraction of [CLS] attention mass kept by the thresholded view
    mask_box: float = 0.5  # default foreground: centred box, sides = this fraction of the image's
    block: int = -1  # transformer block whose attention is read
    max_images: Optional[int] = None
    alpha: float = 0.5  # heat-map opacity over the image
    cmap: str = "jet"
    dpi: int = 100
    device: str = "auto"
    seed: int = 0  # initialisation of --checkpoint random
    backbone: Optional[str] = None  # timm name or synco preset (cpu-demo) for --checkpoint random
    backbone_kwargs: dict = field(default_factory=dict)


def register(sub) -> None:
    p = sub.add_parser(
        "visualize", help="attention / Grad-CAM / saliency maps of checkpoints side by side (PNG + JSON)",
        description=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="run dir, checkpoint.pt, backbone.safetensors, or 'random' (with backbone=NAME); "
                        "repeat for more columns")
    p.add_argument("--images", default=None,
                   help="image file or folder (default: the built-in scikit-image/scikit-learn photos)")
    p.add_argument("--mask", default=None, help="foreground mask image, or a folder of masks named like the images")
    p.add_argument("--linear-head", action="append", default=None,
                   help="linear_head.pt (or its dir) from `synco eval linear`: one for all checkpoints or one "
                        "per checkpoint in order ('none' to skip one)")
    p.add_argument("--label", action="append", default=None, help="column label, one per checkpoint in order")
    p.add_argument("--out", default=None, help="output dir (default: <first run dir>/viz, or runs/viz-random)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="options: " + ", ".join(f"{k}={v!r}" for k, v in asdict(VizOptions()).items()))
    p.set_defaults(func=run)


def default_out(checkpoints: list[str]) -> Path:
    for c in checkpoints:
        if c != "random":
            p = Path(c)
            return (p if p.is_dir() else p.parent) / "viz"
    return Path("runs") / "viz-random"


def parse_views(spec: str) -> Optional[tuple[str, ...]]:
    """None for auto; else the asked views in canonical order."""
    spec = spec.strip().lower()
    if spec == "auto":
        return None
    if spec == "all":
        return ALL_VIEWS
    asked = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [v for v in asked if v not in ALL_VIEWS]
    if bad or not asked:
        raise SyncoError(f"views: unknown view(s) {', '.join(bad) or '(none)'}; choose from auto, all or a comma "
                         f"list of {', '.join(ALL_VIEWS)}.")
    return tuple(v for v in ALL_VIEWS if v in asked)


def _label(checkpoint: str, meta: dict) -> str:
    if checkpoint == "random":
        return "random init"
    p = Path(checkpoint)
    run_dir = p if p.is_dir() else p.parent
    method = meta.get("method")
    if method is None and (run_dir / "config.yaml").is_file():
        import yaml

        try:
            method = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("method")
        except yaml.YAMLError:
            method = None
    epoch = meta.get("epoch")
    name = run_dir.name or str(run_dir)
    parts = [str(method) if method else name]
    extra = ([name] if method else []) + ([f"{epoch} ep"] if isinstance(epoch, int) else [])
    return parts[0] + (f" ({', '.join(extra)})" if extra else "")


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


def _r(x, nd: int = 4):
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, list):
        return [_r(v, nd) for v in x]
    return round(float(x), nd)


def analyse_checkpoint(model, x, fg, views: Optional[tuple[str, ...]], opts: VizOptions, head=None) -> dict:
    """Maps (numpy, for the figures), per-cell notes and metrics (JSON) of one backbone on a batch ``x``
    [B, 3, H, W] with foreground masks ``fg`` [B, H, W]."""
    from ..viz.attention import has_global_attention, threshold_mass, upsample, vit_attention
    from ..viz.metrics import attention_entropy, mask_fraction, max_entropy, row_entropy
    from ..viz.saliency import grad_cam, gradient_saliency

    attention_ok = has_global_attention(model)
    want = views or DEFAULT_VIEWS
    maps: dict = {}
    notes: dict = {}
    metrics: dict = {"attention": attention_ok}
    per_image: dict = {}  # name -> tensor [B] or [B, heads]
    if attention_ok and any(v in want for v in ATTENTION_VIEWS):
        am = vit_attention(model, x, block=opts.block)
        n = am.grid[0] * am.grid[1]
        h_max = max_entropy(n)
        metrics.update(num_patches=n, grid=list(am.grid), max_entropy=_r(h_max))
        if am.cls_heads is not None:
            ent = attention_entropy(am.cls_heads)  # [B, heads]
            ent_mean_map = attention_entropy(am.cls)  # [B], entropy of the head-averaged map (the one shown)
            kept = threshold_mass(am.cls, opts.threshold).flatten(1).sum(1)
            metrics.update(cls_entropy_per_head=_r(ent.mean(0)), cls_entropy_mean=_r(ent.mean()),
                           cls_entropy_normalized=_r(ent.mean() / h_max),
                           cls_entropy_of_head_mean=_r(ent_mean_map.mean()),
                           cls_mask_fraction=_r(mask_fraction(am.cls, fg).mean()),
                           threshold_patches_mean=_r(kept.float().mean()))
            per_image.update(cls_entropy_per_head=ent, cls_entropy_of_head_mean=ent_mean_map,
                             cls_mask_fraction=mask_fraction(am.cls, fg), threshold_patches=kept)
            maps.update(cls=am.cls_image(), threshold=am.cls_threshold(opts.threshold),
                        heads=upsample(am.cls_heads, am.image_size))  # [B, heads, H, W]
            notes["cls"] = [f"H={h:.3f}/{h_max:.3f}" for h in ent_mean_map.tolist()]
            notes["threshold"] = [f"{k}/{n} patches" for k in kept.tolist()]
            notes["heads"] = [[f"H={h:.3f}" for h in row] for row in ent.tolist()]
        rows = row_entropy(am.attn, am.num_prefix)  # [B, heads]
        ent_patch = attention_entropy(am.patch)
        metrics.update(patch_row_entropy_per_head=_r(rows.mean(0)), patch_row_entropy_mean=_r(rows.mean()),
                       patch_entropy_of_head_mean=_r(ent_patch.mean()),
                       patch_mask_fraction=_r(mask_fraction(am.patch, fg).mean()))
        per_image.update(patch_row_entropy_per_head=rows, patch_entropy_of_head_mean=ent_patch,
                         patch_mask_fraction=mask_fraction(am.patch, fg))
        maps["patch"] = am.patch_image()
        notes["patch"] = [f"H={h:.3f}/{h_max:.3f}" for h in ent_patch.tolist()]
    pred = None
    for view, fn in (("gradcam", grad_cam), ("saliency", gradient_saliency)):
        if view in want:
            m, pred = fn(model, x, head=head, return_classes=True)
            frac = mask_fraction(m, fg)
            maps[view] = m
            metrics[f"{view}_mask_fraction"] = _r(frac.mean())
            per_image[f"{view}_mask_fraction"] = frac
            notes[view] = [f"in mask {f:.2f}" for f in frac.tolist()]
    if pred is not None:
        per_image["predicted_class"] = pred
    metrics["per_image"] = [{k: (int(v[i]) if k in ("predicted_class", "threshold_patches") else _r(v[i]))
                             for k, v in per_image.items()} for i in range(x.shape[0])]
    maps = {k: v.detach().cpu().numpy() for k, v in maps.items() if v is not None}
    return {"maps": maps, "notes": notes, "metrics": metrics}


def visualize(checkpoints: list[str], out: Path, opts: VizOptions, images: Optional[str] = None,
              mask: Optional[str] = None, linear_heads: Optional[list[str]] = None,
              labels: Optional[list[str]] = None) -> dict:
    """Run every view for every checkpoint, write the PNGs and ``metrics.json``; returns the JSON dict."""
    from ..eval.common import load_eval_backbone, resolve_device
    from ..eval.head import load_head
    from ..models.backbone import input_size
    from ..viz.figure import HEAT, MASK, Column, grid_figure
    from ..viz.images import denormalize, load_images, load_masks, masks_to_model_geometry, to_model_input
    from ..viz.metrics import centre_box_mask

    views = parse_views(opts.views)
    if not 0.0 < opts.threshold <= 1.0:
        raise SyncoError(f"threshold must be in (0, 1], got {opts.threshold}.")
    if labels and len(labels) != len(checkpoints):
        raise SyncoError(f"give --label once per checkpoint ({len(checkpoints)}); got {len(labels)}.")
    heads = _per_checkpoint(linear_heads, len(checkpoints), "--linear-head")
    device = resolve_device(opts.device)
    photos = load_images(images, opts.max_images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    results, size = [], None
    for i, ckpt in enumerate(checkpoints):
        model, meta = load_eval_backbone(ckpt, opts, device)
        s = input_size(model)
        if size is None:
            size = s
            x_cpu = to_model_input(photos, size)
            if mask:
                fg = masks_to_model_geometry(load_masks(mask, photos), size)
                mask_desc = str(mask)
            else:
                fg = centre_box_mask(size, size, opts.mask_box).expand(len(photos), size, size)
                mask_desc = f"centre box, sides {opts.mask_box} of the image"
            display = denormalize(x_cpu)
        elif s != size:
            raise SyncoError(f"checkpoint '{ckpt}' takes {s}px inputs but the first one takes {size}px: "
                             "compare backbones with the same input size in one figure.")
        head = None
        if heads[i] and heads[i].lower() != "none":
            head, _ = load_head(heads[i], expect_dim=meta["num_features"])
            head = head.to(device)
        r = analyse_checkpoint(model, x_cpu.to(device), fg.to(device), views, opts, head=head)
        r["label"] = labels[i] if labels else _label(ckpt, meta)
        r["meta"] = {k: meta.get(k) for k in ("backbone", "backbone_kwargs", "method", "epoch", "source")}
        r["meta"]["linear_head"] = heads[i]
        results.append(r)
        del model
    col_labels = _unique([r["label"] for r in results])
    for r, lab in zip(results, col_labels):
        r["label"] = lab

    names = [p.name for p in photos]
    present = [v for v in ALL_VIEWS if any(v in r["maps"] for r in results)]
    written = {}
    titles = {
        "cls": "[CLS] attention, last block, mean over heads",
        "threshold": f"[CLS] attention: patches holding {opts.threshold:.0%} of the mass",
        "patch": "patch self-attention (received from other patches, [CLS] excluded)",
        "gradcam": "Grad-CAM, last feature map", "saliency": "gradient saliency |dy/dx|",
    }
    for view in (v for v in present if v in (views or DEFAULT_VIEWS)):
        if view == "heads":
            cols = []
            for r in results:
                hm = r["maps"].get("heads")
                if hm is None:
                    cols.append(Column(r["label"], None))
                    continue
                hn = r["notes"].get("heads")
                cols += [Column(f"{r['label']} h{h}", hm[:, h], notes=[row[h] for row in hn] if hn else None)
                         for h in range(hm.shape[1])]
            path = grid_figure(out / "cls_heads.png", display, cols, names, kind=HEAT, alpha=opts.alpha,
                               cmap=opts.cmap, dpi=opts.dpi, title="[CLS] attention per head, last block")
        else:
            cols = [Column(r["label"], r["maps"].get(view), notes=r["notes"].get(view)) for r in results]
            fname = {"cls": "cls_attention", "patch": "patch_attention", "threshold": "cls_threshold"}.get(view, view)
            path = grid_figure(out / f"{fname}.png", display, cols, names,
                               kind=MASK if view == "threshold" else HEAT, alpha=opts.alpha, cmap=opts.cmap,
                               dpi=opts.dpi, title=titles[view])
        written[view] = str(path)

    report = {
        "images": names, "image_size": size, "mask": mask_desc,
        "mask_area_fraction": _r(fg.float().mean(dim=(-2, -1)).mean()),
        "threshold": opts.threshold, "views": list(written), "figures": written,
        "entropy_units": "nats (max = log(num_patches))",
        "checkpoints": [{"label": r["label"], **r["meta"], **r["metrics"]} for r in results],
        "options": asdict(opts),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def run(args) -> int:
    opts = apply_overrides(VizOptions(), args.overrides or [])
    out = Path(args.out) if args.out else default_out(args.checkpoint)
    report = visualize(args.checkpoint, out, opts, images=args.images, mask=args.mask,
                       linear_heads=args.linear_head, labels=args.label)
    keys = ("label", "cls_entropy_per_head", "cls_entropy_mean", "max_entropy", "patch_row_entropy_mean",
            "cls_mask_fraction", "patch_mask_fraction", "gradcam_mask_fraction", "saliency_mask_fraction")
    summary = {"out": str(out), "mask_area_fraction": report["mask_area_fraction"],
               "checkpoints": [{k: c[k] for k in keys if k in c} for c in report["checkpoints"]]}
    print(json.dumps(summary, indent=2))
    print(f"synco: wrote {', '.join(Path(p).name for p in report['figures'].values())} and metrics.json "
          f"to {out}", file=sys.stderr)
    return 0
