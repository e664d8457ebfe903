"""Process-wide CPU settings of training processes (synco.device)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

_ALLOC_LOOP = """
import resource, sys, torch
from synco.device import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    xs = [torch.ones(1 << 20) * 2 for _ in range(4)]
    del xs
rounds = []
for _ in range(21):  # a step's pattern: a few MB-sized tensors made, written, freed
    f0 = faults()
    xs = [torch.ones(1 << 20) * 2 for _ in range(4)]
    del xs
    rounds.append(faults() - f0)
print(kept, sum(rounds))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="no mallopt (not glibc)")
def test_kept_freed_memory_is_not_faulted_in_again():
    """With the setting (what training processes call) freed 4 MB blocks are reused: 21 rounds of four fresh
    16 MB-in-all tensors fault in at most about one round's pages (4,096 of 4 KiB), not every round's (86,016).
    Without it, glibc may hand the blocks back and fault them in again, or may not (its mmap threshold adapts to
    the first frees, differently from run to run), so the default is not compared: only the setting's promise is
    checked."""
    out = subprocess.run([sys.executable, "-c", _ALLOC_LOOP, "kept"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True"
    one_round = 4 * (1 << 20) * 4 // 4096  # four tensors of 2^20 float32, in 4 KiB pages
    assert float(out[1]) < 21 * one_round / 4, out
