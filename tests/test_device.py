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
    """Without the setting glibc hands the freed 4 MB blocks back and faults them in again (thousands
    of page faults); with it (what training processes call) they are reused."""
    runs = {mode: subprocess.run([sys.executable, "-c", _ALLOC_LOOP, mode], capture_output=True, text=True,
                                 check=True).stdout.split() for mode in ("default", "kept")}
    assert runs["kept"][0] == "True"
    default_faults, kept_faults = float(runs["default"][1]), float(runs["kept"][1])
    assert default_faults > 1000 and kept_faults < default_faults / 5, runs
