"""File helpers every layer may use: atomic writes and safe loading of torch files."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import SyncoError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_save(obj, path) -> None:
    """torch.save to a temp file in the same folder, fsync, rename: readers never see half a file."""
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path) -> None:
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_torch_file(path) -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for corrupt or foreign files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/IO failure is the user's file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise SyncoError(f"cannot read '{path}' ({e.__class__.__name__}: {first}). It may be corrupt, "
                         "truncated or not a synco file.") from None
