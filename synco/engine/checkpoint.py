"""Atomic checkpoint files: written to a temp file in the same folder, fsynced, then renamed.

A kill at any moment leaves either the previous complete checkpoint or the new one, never half.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..io import atomic_save, atomic_write_text  # noqa: F401 (the engine's checkpoint API)
from ..io import load_torch_file as load  # noqa: F401


def rng_state() -> dict:
    """RNG states as plain tensors/tuples so ``torch.load(weights_only=True)`` can read them back."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
