"""`synco` command line: one command, a subcommand per job. Each subcommand lives in its own module
with ``register(subparsers)``; user errors print one paragraph and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import signal
import sys
import warnings
from typing import Optional

from .. import __version__
from ..errors import Interrupted, SyncoError

SUBCOMMANDS = ("pretrain", "evaluate", "report", "synth_data", "visualize", "sweep", "views", "doctor")


def create_parser() -> argparse.ArgumentParser:
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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning for a user of the command line: its text, not the source line that raised it."""
    return f"synco: warning: {message}\n"


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.formatwarning = _one_line_warning
    parser = create_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after flags: collect the ones argparse left over.
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    code = _run(args)
    if code != 0:  # workers an error left running would hang the exit (they ignore SIGTERM)
        from ..engine.signals import release_workers

        release_workers()
    return code


def _run(args) -> int:
    """The subcommand, with every expected failure turned into one paragraph on stderr and its exit status."""
    from ..engine.signals import handle_signals

    try:
        with handle_signals():  # SIGINT/SIGTERM: a message, and training stops with a checkpoint
            return int(args.func(args) or 0)
    except Interrupted as e:
        print(f"synco: {e}", file=sys.stderr)
        return e.exit_code
    except SyncoError as e:
        print(f"synco: error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synco: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        message = os_error_message(e)
        if message is None:
            raise
        print(f"synco: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if str(e).startswith("Symlink loop from"):  # pathlib's resolve() raises this, not an OSError
            print(f"synco: error: {symlink_loop_message(str(e)[len('Symlink loop from '):].strip(chr(39)))}",
                  file=sys.stderr)
            return 2
        stopped = worker_killed(e)
        if stopped is None:
            raise
        print(f"synco: {stopped[0]}", file=sys.stderr)
        return stopped[1]


def user_message(e: SyncoError) -> str:
    """The error's own paragraph. A SyncoError raised in a DataLoader worker comes back wrapped by torch in
    "Caught SyncoError in DataLoader worker process 0. Original Traceback ...": keep only its message."""
    text, marker = str(e), f"{type(e).__name__}: "  # torch re-raises the worker's own class (a SyncoError subclass)
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return text


def worker_killed(e: BaseException) -> Optional[tuple[str, int]]:
    """(message, exit code) when a DataLoader worker was killed by a signal (torch's RuntimeError), else None.
    SIGTERM/SIGINT sent to the whole process group reach the workers too: that is a stop, not a crash."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if "DataLoader worker" in text and "killed by signal" in text:
            if "Terminated" in text or "Interrupt" in text:
                sig = signal.SIGTERM if "Terminated" in text else signal.SIGINT
                name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT (Ctrl-C)"
                return (f"{name} received: stopped. A pretraining run keeps its last checkpoint and resumes from "
                        "it when the same command is re-run.", 128 + int(sig))
            return (f"error: a data-loading worker died ({text.split('killed by signal:')[-1].strip()}); if the "
                    "machine ran out of memory, lower data.num_workers (or num_workers=) and re-run: a "
                    "pretraining run resumes from its last checkpoint.", 2)
        e = e.__cause__ or e.__context__
    return None


def os_error_message(e: OSError) -> Optional[str]:
    """One line for the OS errors a user can fix (a full disk, a read-only or forbidden location, a name too long,
    a symbolic-link loop, a file where a folder belongs); None for anything else, which is a bug and keeps its
    traceback."""
    name = str(e.filename) if getattr(e, "filename", None) else ""
    where = f" ({_short(name)})" if name else ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"disk full{where}: free some space and re-run the same command (a run resumes from its last "
                "checkpoint).")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {e.strerror}. Choose a location you can write to."
    if e.errno == errno.ENAMETOOLONG:
        return (f"a file or folder name is too long{where}: the file system allows at most 255 bytes per name "
                "(and about 4096 per path). Choose a shorter path.")
    if e.errno == errno.ELOOP:
        return symlink_loop_message(name)
    if e.errno in (errno.ENOTDIR, errno.EISDIR):
        return f"{e.strerror}{where}: a part of this path is a file where a folder is needed, or the other way round."
    return None


def symlink_loop_message(path: str) -> str:
    where = f" at {_short(path)}" if path else ""
    return (f"too many levels of symbolic links{where}: a symbolic link points back to itself or to a folder "
            "above it (a loop). Fix or remove that link, or choose another path.")


def _short(path: str, n: int = 120) -> str:
    """A path for a one-line message: a 300-character name would bury the message itself."""
    return path if len(path) <= n else f"{path[:n // 2]}...{path[-n // 2:]}"
