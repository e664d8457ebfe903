"""Synchronised BatchNorm for the [N, C] heads, the same code on every device and backend (NCCL, gloo).

torch's ``nn.SyncBatchNorm`` refuses CPU tensors, and on CUDA it all-gathers every rank's count and reads it
back, so each call waits for the GPU (6 per micro-batch here) and ``torch.compile`` breaks its graph there.
Here every rank holds the same local batch (the samplers drop the last partial batch), so the global count
``n = world * N`` is known on the host, and two autograd-aware all-reduces of ``[C]`` vectors give the global
statistics with nothing read back::

    mean = sum_i x_i / n                 (over all ranks)
    var  = sum_i (x_i - mean)^2 / n      (biased, as BatchNorm normalises; centred first, as BatchNorm's own
                                          two-pass maths: features with a large mean keep their precision)

Gradients flow through both all-reduces (their backward all-reduces the gradient), so they are those of BatchNorm
over the global batch, as with ``nn.SyncBatchNorm``. The all-reduces are torch's functional collectives, which
``torch.compile`` traces (``fullgraph=True`` holds under DDP, tested in 2 gloo processes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks, differentiable (its backward all-reduces the gradient) and traceable: torch.compile
    keeps it in the graph, where ``torch.distributed.nn``'s all-reduce ends compilation of the rest of the frame."""
    return funcol.all_reduce(t, "sum", dist.group.WORLD)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over [N, C] with statistics over the batches of all processes (equal N on every rank)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dtype, x = x.dtype, x.float()  # statistics in float32, as BatchNorm computes them under autocast
        n = x.shape[0] * dist.get_world_size()
        mean = all_reduce(x.sum(0)) / n
        var = all_reduce(((x - mean) ** 2).sum(0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * (n / (n - 1)), m)
                self.num_batches_tracked.add_(1)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias if self.affine else y).to(dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` of ``module`` by :class:`SyncBatchNorm1d` with the very same parameters and
    buffers (and so their ``requires_grad``), as torch's converter does. Other BatchNorms (2-D/3-D, in convolutional
    backbones) become ``nn.SyncBatchNorm`` on CUDA and stay per-process elsewhere (torch has no CPU version)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            for key, value in list(child._parameters.items()) + list(child._buffers.items()):
                setattr(new, key, value)
            new.train(child.training)
            setattr(module, name, new)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm1d):
            if device.type == "cuda":
                setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            convert_sync_batchnorm(child, device)
    return module
