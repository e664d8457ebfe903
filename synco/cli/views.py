"""`synco views [--config P] --out DIR [--n N] [--epoch E] [--save] [--device D] [key=value ...]`"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import load_config, preset_names


def register(sub) -> None:
    p = sub.add_parser("views", help="what a config's augmentations do to its training images (PNG grid, tensors)",
                       description="Makes the two training views of N images of the config's training set with the "
                                   "code a run uses (its data.augment.on path, seed and epoch), and writes DIR/"
                                   "views.png: each image, then its two views. --save also writes DIR/views.pt "
                                   "({'view1', 'view2': uint8 [N, 3, H, W], 'index': [N]}, the views before "
                                   f"normalisation). Presets: {', '.join(preset_names())}.")
    p.add_argument("--config", default="cpu-demo", help="preset name or YAML file (default: cpu-demo)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=8, help="images, spread over the training set (default: 8)")
    p.add_argument("--epoch", type=int, default=0, help="the epoch whose views to make (default: 0)")
    p.add_argument("--save", action="store_true", help="also write views.pt")
    p.add_argument("--device", default="cpu", help="where on=device views are made (default: cpu; the views are "
                                                   "the same on any device)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/data")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..device import resolve_device
    from ..errors import SyncoError
    from ..io import check_output_dir
    from ..viz.views import render_views

    cfg = load_config(args.config, args.overrides)
    if args.epoch < 0:
        raise SyncoError(f"--epoch must be >= 0, got {args.epoch}.")
    if args.n < 1:
        raise SyncoError(f"--n must be >= 1, got {args.n}.")
    device = resolve_device(args.device)
    out = check_output_dir(Path(args.out), "--out")
    written = render_views(cfg, out, n=args.n, save=args.save, epoch=args.epoch, device=device)
    print(json.dumps(written, indent=2))
    print(f"synco: wrote {written['png']}" + (f" and {written['pt']}" if "pt" in written else ""), file=sys.stderr)
    return 0
