"""Which torch device a run uses."""

from __future__ import annotations

import torch

from .errors import SyncoError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when visible; asking for CUDA without a GPU is a user error, not a traceback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SyncoError(f"device={name} was asked for but no CUDA GPU is visible; use device=cpu or device=auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SyncoError(f"device={name!r} is not a torch device (use auto, cpu or cuda).") from None


def use_bf16(precision: str, device: torch.device) -> bool:
    """``precision=auto`` means bf16 autocast on CUDA and fp32 elsewhere (CPUs without bf16 units run it slower)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")
