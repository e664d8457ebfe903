"""Synchronised BatchNorm for every device.

On CUDA this is torch's ``SyncBatchNorm``. torch's version refuses CPU tensors, so CPU (gloo) runs use
``CPUSyncBatchNorm``: batch statistics all-reduced with the autograd-aware collective of
``torch.distributed.nn``, so gradients flow through the global mean/variance just as in SyncBatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce


class CPUSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over [N, C] with statistics over the batches of all processes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dtype, x = x.dtype, x.float()  # statistics in float32, as BatchNorm computes them under autocast
        n = all_reduce(torch.tensor([float(x.shape[0])]))
        mean = all_reduce(x.sum(0)) / n
        var = all_reduce(((x - mean) ** 2).sum(0)) / n  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
                self.num_batches_tracked.add_(1)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias if self.affine else y).to(dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            # keep the very same parameters and buffers (and so their requires_grad), as torch's converter does
            for key, value in list(child._parameters.items()) + list(child._buffers.items()):
                setattr(new, key, value)
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module
