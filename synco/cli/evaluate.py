"""`synco eval <protocol> --checkpoint PATH [--out DIR] [key=value ...]`.

Protocols register themselves from their own CLI modules (``register_protocols(sub)``), so adding one
touches its module only."""

from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path

from ..engine import dist
from ..errors import SyncoError
from ..options import apply_overrides, check_options

logger = logging.getLogger("synco")
# Protocols whose accuracy is meaningless with fewer than two classes (100 % by construction).
CLASSIFICATION_PROTOCOLS = ("knn", "linear", "finetune")

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
    for parser in psub.choices.values():  # every protocol writes results: one process per output folder
        parser.set_defaults(func=locked(parser.get_default("func")))


def locked(func):
    """``func(args)`` holding ``OUT/.synco.lock`` (rank 0 only, as ``synco pretrain`` holds its run folder's): two
    evaluations on one --out would overwrite each other's results, caches and probe checkpoints. A lock left by
    a killed evaluation is taken over. :func:`options_from` takes it once the options are checked (no folder is
    made for a command that fails its checks); efficiency, which has no such step, takes it here."""
    @functools.wraps(func)
    def run(args):
        try:
            if args.protocol == "efficiency" and _launch_rank() == 0:
                from ..io import check_output_dir

                out = Path(args.out) if args.out else Path("runs") / "efficiency"
                take_out_lock(args, check_output_dir(out, "--out"))
            return func(args)
        finally:
            lock = getattr(args, "out_lock", None)
            if lock is not None:
                lock.release()

    return run


def take_out_lock(args, out: Path) -> None:
    from ..io import DirLock

    args.out_lock = DirLock(out, f"evaluation ({args.protocol})").acquire()


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
    """Protocol options dataclass with the command line's key=value overrides applied, checked before any
    work: every option's declared bounds, the output folder is writable, ``backbone=`` agrees with the
    checkpoint, the data has classes."""
    from ..engine.dist import init_distributed
    from ..eval.common import resolve_device
    from ..io import check_output_dir, remove_stale_temps

    opts = apply_overrides(options_cls(), args.overrides)
    check_options(opts)
    out = Path(args.out) if args.out else default_out(args.checkpoint, args.protocol)
    if args.protocol != "transfer":
        infer_folder_dataset(opts)
    check_backbone_option(args.checkpoint, opts)
    if args.protocol in CLASSIFICATION_PROTOCOLS:
        require_two_classes(opts)
    if _launch_rank() == 0:
        check_output_dir(out, "--out")
        take_out_lock(args, out)  # released by locked() when the command ends, however it ends
        remove_stale_temps(out)
    init_distributed(resolve_device(opts.device).type)
    return opts, out


def _launch_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def infer_folder_dataset(opts) -> None:
    """``root=DIR`` without ``dataset=``: the built-in digits take no root, so the folder is meant."""
    if getattr(opts, "dataset", None) == "digits" and getattr(opts, "root", None):
        opts.dataset = "folder"
        logger.warning("root=%s is given without dataset=: using dataset=folder (the built-in digits take no "
                       "root)", opts.root)


def check_backbone_option(checkpoint: str, opts) -> None:
    """``backbone=`` / ``backbone_kwargs=`` choose the architecture of ``--checkpoint random`` (or of a
    safetensors file without synco metadata); for a trained checkpoint they must agree with what it holds."""
    name = getattr(opts, "backbone", None)
    kwargs = getattr(opts, "backbone_kwargs", None) or {}
    if checkpoint == "random" or (not name and not kwargs):
        return
    from ..eval.common import backbone_spec
    from ..models.backbone import peek_meta

    meta = peek_meta(checkpoint)
    if meta is None:
        return  # a bare safetensors file: backbone= is how its architecture is given
    wanted = backbone_spec(opts)[0] if name else meta["backbone"]
    if wanted != meta["backbone"]:
        raise SyncoError(f"--checkpoint {checkpoint} holds a '{meta['backbone']}' backbone, but backbone={name} "
                         "was given. backbone= only chooses the architecture of --checkpoint random; drop it to "
                         f"evaluate this checkpoint, or point --checkpoint at a {wanted} run.")
    differing = {k: v for k, v in kwargs.items()  # only what was given explicitly, not a preset's kwargs
                 if k not in meta["backbone_kwargs"] or meta["backbone_kwargs"][k] != v}
    if differing:
        raise SyncoError(f"--checkpoint {checkpoint} was trained with backbone_kwargs={meta['backbone_kwargs']}; "
                         f"the given {differing} cannot apply to its weights. Drop backbone_kwargs=.")


def require_two_classes(opts) -> None:
    if not hasattr(opts, "dataset"):
        return
    from ..data.build import count_classes

    n = count_classes(opts.dataset, root=getattr(opts, "root", None), class_list=getattr(opts, "class_list", None))
    if n is not None and n < 2:
        raise SyncoError(f"the {opts.dataset} data at {getattr(opts, 'root', None)} has {n} class: a classifier's "
                         "accuracy would be 100 % by construction. Evaluate on data with at least two classes.")


def run_protocol(args, options_cls, protocol) -> int:
    """The shape of every protocol command: options from the flags and ``key=value``, the protocol on the
    checkpoint into ``--out``, then the common wind-down."""
    opts, out = options_from(args, options_cls)
    protocol(args.checkpoint, out, opts, progress=not args.no_progress)
    finish()
    return 0


def finish() -> None:
    dist.cleanup()
