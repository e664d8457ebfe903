"""`synco pretrain [--config PRESET_OR_YAML] [--out DIR] [key=value ...]`"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import load_config, preset_names


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining (synco, moby or byol)",
                       description="Pretrain a backbone. With no arguments: the cpu-demo preset on the built-in "
                                   f"digits. Presets: {', '.join(preset_names())}.")
    p.add_argument("--config", default="cpu-demo", help="preset name or YAML file (default: cpu-demo)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>, a fresh one if that "
                                               "holds a finished run; a killed run there is resumed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=10")
    p.set_defaults(func=run)


def default_out(preset: str) -> Path:
    """runs/<preset>; a new numbered sibling when that one already finished, so re-running the same
    command after a kill resumes, while running it after completion starts fresh."""
    base = Path("runs") / Path(preset).stem
    out, n = base, 1
    while (out / "summary.json").exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def run(args) -> int:
    from ..pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else default_out(args.config)
    print(f"synco: {cfg.method} / {cfg.model.backbone} on {cfg.data.dataset} -> {out}", file=sys.stderr)
    summary = pretrain(cfg, out, progress=not args.no_progress)
    keys = ("method", "backbone", "epochs", "knn_top1", "knn_top1_random_init", "knn_top1_pixels",
            "images_per_second")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return 0
