"""`synco eval <protocol> --checkpoint PATH [--out DIR] [key=value ...]`.

Protocols register themselves from their own CLI modules (``register_protocols(sub)``), so adding one
touches its module only."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..config import apply_overrides
from ..engine import dist as D

PROTOCOL_MODULES = ("synco.cli.eval_knn", "synco.cli.eval_protocols", "synco.cli.eval_robust")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a pretrained backbone (knn, linear, finetune, transfer, ...)")
    psub = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for name in PROTOCOL_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register_protocols(psub)


def common_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoint.pt, backbone.safetensors, or 'random' (with backbone=NAME)")
    p.add_argument("--out", default=None, help="output dir (default: <run dir>/eval, or eval/random)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="protocol options, e.g. dataset=digits")


def default_out(checkpoint: str, protocol: str) -> Path:
    if checkpoint == "random":
        return Path("runs") / "eval-random"
    p = Path(checkpoint)
    return (p if p.is_dir() else p.parent) / "eval"


def options_from(args, options_cls):
    """Protocol options dataclass with the command line's key=value overrides applied."""
    from ..engine.dist import init_distributed
    from ..eval.common import resolve_device

    opts = apply_overrides(options_cls(), args.overrides)
    init_distributed(resolve_device(opts.device).type)
    return opts, Path(args.out) if args.out else default_out(args.checkpoint, args.protocol)


def finish() -> None:
    D.cleanup()
