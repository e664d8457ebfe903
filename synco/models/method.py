"""SynCo-v2 / MoBY / BYOL in one module (Algorithm 1 of SynBY); the method is a switch, not a copy.

- online  = backbone + projector + predictor (trained); target = backbone + projector (EMA of online).
- synco:  symmetric InfoNCE over [positive, K queue negatives, synthetic hard negatives];
- moby:   the same without synthetic negatives;
- byol:   2 - 2cos(prediction, target projection), no negatives, no queues.
Each view's queries meet the *other* view's queue (q1 vs queue2, q2 vs queue1), and each view's
keys are enqueued in their own queue, as in MoBY.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import method_spec
from ..losses import byol_loss, info_nce
from ..negatives import SyntheticNegatives
from .backbone import TokenBatchNorm, backbone_from_config
from .heads import MLPHead


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.BatchNorm1d, TokenBatchNorm, nn.SyncBatchNorm)) for m in module.modules())


class Encoder(nn.Module):
    """backbone -> projector [-> predictor], applied to both views in one call (one DDP forward)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        # Without BatchNorm in the backbone, one batched call over both views is the same maths and faster;
        # the heads always see one view at a time, so their BatchNorm statistics are per view as in MoBY.
        self.batch_views = not _has_batchnorm(backbone)

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        z = self.projector(f)
        return self.predictor(z) if self.predictor is not None else z

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_views:
            f1, f2 = self.backbone(torch.cat([x1, x2])).chunk(2)
        else:
            f1, f2 = self.backbone(x1), self.backbone(x2)
        return self._head(f1), self._head(f2)


class SelfSupervisedModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        self.method = cfg.method
        self.spec = method_spec(cfg)
        self.temperature = cfg.contrast.temperature
        backbone = backbone_from_config(m, drop_path_rate=m.drop_path_online)
        dim = backbone.num_features
        self.online = Encoder(backbone, MLPHead(dim, m.proj_hidden, m.proj_dim),
                              MLPHead(m.proj_dim, m.pred_hidden, m.proj_dim))
        self.target = Encoder(backbone_from_config(m, drop_path_rate=m.drop_path_target),
                              MLPHead(dim, m.proj_hidden, m.proj_dim))
        self.target.load_state_dict(self._online_target_state(), strict=True)
        self.target.requires_grad_(False)
        self._ema_pairs: Optional[tuple[list, list]] = None

        self.negatives = None
        if self.spec.uses_synthetic:
            n = cfg.negatives
            self.negatives = SyntheticNegatives(n_hard=n.n_hard, counts=tuple(n.counts), alpha_max=n.alpha_max,
                                                beta_max=n.beta_max, sigma=n.sigma, delta=n.delta, eta=n.eta)
        if self.uses_queue:
            k = cfg.contrast.queue_size
            self.register_buffer("queue1", F.normalize(torch.randn(k, m.proj_dim), dim=1))
            self.register_buffer("queue2", F.normalize(torch.randn(k, m.proj_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def uses_queue(self) -> bool:
        return self.spec.uses_queue

    @property
    def uses_synthetic(self) -> bool:
        return self.spec.uses_synthetic

    def _online_target_state(self) -> dict:
        return {k: v for k, v in self.online.state_dict().items() if not k.startswith("predictor.")}

    def no_weight_decay(self) -> set[str]:
        """Names timm's param-group helper exempts from weight decay (besides all 1-D params)."""
        inner = getattr(self.online.backbone, "no_weight_decay", lambda: set())()
        return {f"online.backbone.{n}" for n in inner}

    def train(self, mode: bool = True):
        super().train(mode)
        self.target.train(mode)  # the target uses batch statistics too, as in MoBY
        return self

    # -- the step ---------------------------------------------------------------------------------

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, use_synthetic: bool = False,
                online: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None):
        """Loss of one batch. ``online`` may be the DDP-wrapped ``self.online``.

        Returns (loss, stats, keys) where keys = (k1, k2) are the normalised target features to enqueue
        (after gathering across processes) once the optimizer has stepped.
        """
        # `is None`, not `or`: bool() of a torch.compile wrapper calls len() and fails.
        q1, q2 = (self.online if online is None else online)(x1, x2)
        with torch.no_grad():
            k1, k2 = self.target(x1, x2)
        k1, k2 = F.normalize(k1.float(), dim=1), F.normalize(k2.float(), dim=1)
        if not self.uses_queue:
            l1, s1 = byol_loss(q1, k2)
            l2, s2 = byol_loss(q2, k1)
        else:
            q1, q2 = F.normalize(q1.float(), dim=1), F.normalize(q2.float(), dim=1)
            syn1 = syn2 = None
            if use_synthetic and self.negatives is not None:
                syn1 = self.negatives(q1.detach(), self.queue2, generator=generator)
                syn2 = self.negatives(q2.detach(), self.queue1, generator=generator)
            slices = self.negatives.slices if self.negatives is not None else None
            l1, s1 = info_nce(q1, k2, self.queue2, self.temperature, syn1, slices)
            l2, s2 = info_nce(q2, k1, self.queue1, self.temperature, syn2, slices)
        stats = {key: (s1[key] + s2[key]) / 2 for key in s1}
        return l1 + l2, stats, (k1, k2)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """target <- m * target + (1 - m) * online, over backbone and projector, in one foreach call."""
        if self._ema_pairs is None:
            online = dict(self.online.named_parameters())
            names = [n for n, _ in self.target.named_parameters()]
            self._ema_pairs = ([p for _, p in self.target.named_parameters()], [online[n] for n in names])
        tgt, src = self._ema_pairs
        torch._foreach_lerp_(tgt, src, 1.0 - m)

    @torch.no_grad()
    def enqueue(self, k1: torch.Tensor, k2: torch.Tensor) -> None:
        """Replace the oldest entries with the (globally gathered) keys; no host sync."""
        if not self.uses_queue:
            return
        n, size = k1.shape[0], self.queue1.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the global batch {n}")
        idx = (self.queue_ptr + torch.arange(n, device=k1.device)) % size
        self.queue1.index_copy_(0, idx, k1.to(self.queue1.dtype))
        self.queue2.index_copy_(0, idx, k2.to(self.queue2.dtype))
        self.queue_ptr.add_(n).remainder_(size)

    def _apply(self, fn, recurse=True):
        self._ema_pairs = None  # parameters may be replaced by .to()/.cuda()
        return super()._apply(fn, recurse)
