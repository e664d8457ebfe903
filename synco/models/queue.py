"""The memory bank of a contrastive method: MoBY's two FIFO queues of past target keys, one per view.

A small module of its own (as lightly's ``MemoryBankModule``), usable without the rest of the model. Each view's
keys go to their own queue, and each view's queries are contrasted with the *other* view's queue; the queues share
one write pointer because both views of a batch are enqueued together.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KeyQueues(nn.Module):
    """Two queues of ``size`` L2-normalised keys of ``dim`` features, initialised at random on the sphere.

    Buffers (saved in checkpoints): ``queue1`` and ``queue2`` ``[size, dim]``, and ``ptr`` (the next slot). ``labels``
    ``[size]`` holds the class of each slot's image where the data has one (-1: unknown), for diagnostics only (the
    precision of a false-negative detector): nothing trains on it, and it is not saved (after a resume it fills
    again as the queue turns over).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("queue1", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("queue2", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long), persistent=False)

    @property
    def size(self) -> int:
        return self.queue1.shape[0]

    @torch.no_grad()
    def enqueue(self, k1: torch.Tensor, k2: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Replace the oldest ``n`` entries of each queue with the keys of view 1 and view 2.

        Args:
            k1, k2: ``[n, dim]`` normalised keys of the whole (all-gathered) batch; ``size`` must be a multiple of n,
                so every write is one contiguous slice and the queues stay aligned across steps.
            labels: optional ``[n]`` classes of the batch's images (unknown: -1).

        The pointer stays on the device: no host sync.
        """
        n = k1.shape[0]
        if self.size % n:
            raise ValueError(f"queue size {self.size} is not a multiple of the global batch {n}")
        idx = (self.ptr + torch.arange(n, device=k1.device)) % self.size
        self.queue1.index_copy_(0, idx, k1.to(self.queue1.dtype))
        self.queue2.index_copy_(0, idx, k2.to(self.queue2.dtype))
        if labels is None:
            self.labels.index_fill_(0, idx, -1)
        else:
            self.labels.index_copy_(0, idx, labels.to(self.labels))
        self.ptr.add_(n).remainder_(self.size)


# Checkpoints written before the queues were a module of their own name the buffers at the model's top level.
LEGACY_KEYS = {"queue1": "queue.queue1", "queue2": "queue.queue2", "queue_ptr": "queue.ptr"}


def rename_legacy_keys(state_dict: dict, prefix: str = "") -> None:
    """Map the old top-level queue buffer names in ``state_dict`` (in place) to ``KeyQueues``'."""
    for old, new in LEGACY_KEYS.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
