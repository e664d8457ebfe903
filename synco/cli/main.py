"""`synco` command line: one command, a subcommand per job. Each subcommand lives in its own module
with ``register(subparsers)``; user errors print one paragraph and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

from .. import __version__
from ..errors import SyncoError

SUBCOMMANDS = ("pretrain", "evaluate", "report", "synth_data", "visualize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synco", description="Self-supervised vision transformers with synthetic hard negatives.")
    parser.add_argument("--version", action="version", version=f"synco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"synco.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"synco.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after flags: collect the ones argparse left over.
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    try:
        return int(args.func(args) or 0)
    except SyncoError as e:
        print(f"synco: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synco: interrupted", file=sys.stderr)
        return 130
