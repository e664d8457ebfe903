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
from dataclasses import asdict
from pathlib import Path

from ..options import apply_overrides, check_options
from ..viz.compare import VizOptions, visualize


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


def run(args) -> int:
    from ..io import check_output_dir

    opts = apply_overrides(VizOptions(), args.overrides or [])
    check_options(opts)
    out = check_output_dir(Path(args.out) if args.out else default_out(args.checkpoint), "--out")
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
