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

from ..hard_negatives import detect_false_negatives
from ..losses import Strategy, byol_loss, info_nce
from ..methods import METHOD_SPECS, method_spec, negatives_kwargs, strategy_kwargs
from ..negatives import SyntheticNegatives
from .backbone import TokenBatchNorm, backbone_kwargs, create_backbone
from .heads import MLPHead
from .queue import KeyQueues, rename_legacy_keys


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.BatchNorm1d, TokenBatchNorm, nn.SyncBatchNorm)) for m in module.modules())


class Encoder(nn.Module):
    """backbone -> projector [-> predictor], applied to both views in one call (one DDP forward)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        # Without BatchNorm in the backbone, one batched call over both views is the same maths, with the drop-path
        # draws of every committed result (two calls would draw differently); its speed against two calls is in
        # docs/results (speed of the loop). The heads always see one view at a time, so their BatchNorm
        # statistics are per view as in MoBY.
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


def model_kwargs(cfg) -> dict:
    """:class:`SelfSupervisedModel`'s arguments from a config (timm's ``x_kwargs(cfg)`` + ``create_x(**kw)`` pair)."""
    m, spec = cfg.model, method_spec(cfg)
    return dict(method=cfg.method, backbone=backbone_kwargs(m), drop_path_online=m.drop_path_online,
                drop_path_target=m.drop_path_target, proj_hidden=m.proj_hidden, proj_dim=m.proj_dim,
                pred_hidden=m.pred_hidden, temperature=cfg.contrast.temperature, queue_size=cfg.contrast.queue_size,
                negatives=negatives_kwargs(cfg) if spec.uses_synthetic else None,
                strategy=strategy_kwargs(cfg) if spec.uses_queue else None)


def create_model(cfg) -> SelfSupervisedModel:
    return SelfSupervisedModel(**model_kwargs(cfg))


class SelfSupervisedModel(nn.Module):
    """Online and target encoders, the key queues, the synthetic-negative generator and the loss of one method.

    Args:
        method: synco, moby or byol; what it needs (queues, synthetic negatives) is its :class:`MethodSpec`.
        backbone: :func:`~synco.models.backbone.create_backbone` arguments (the timm name and its kwargs).
        drop_path_online, drop_path_target: stochastic-depth rates of the two backbones (Table 3).
        proj_hidden, proj_dim, pred_hidden: widths of the projector and predictor MLPs.
        temperature: tau of InfoNCE.
        queue_size: keys per queue (methods with queues only).
        negatives: :class:`~synco.negatives.SyntheticNegatives` arguments (methods with synthetic negatives only;
            None takes its defaults).
        strategy: :class:`~synco.losses.Strategy` arguments, how the loss treats its negatives (queue methods;
            None: InfoNCE).
    """

    def __init__(self, *, method: str, backbone: dict, proj_hidden: int, proj_dim: int, pred_hidden: int,
                 drop_path_online: float = 0.0, drop_path_target: float = 0.0, temperature: float = 0.2,
                 queue_size: int = 4096, negatives: Optional[dict] = None, strategy: Optional[dict] = None):
        super().__init__()
        self.method = method
        self.spec = METHOD_SPECS[method]
        self.temperature = temperature
        online_backbone = create_backbone(**backbone, drop_path_rate=drop_path_online)
        dim = online_backbone.num_features
        self.online = Encoder(online_backbone, MLPHead(dim, proj_hidden, proj_dim),
                              MLPHead(proj_dim, pred_hidden, proj_dim))
        self.target = Encoder(create_backbone(**backbone, drop_path_rate=drop_path_target),
                              MLPHead(dim, proj_hidden, proj_dim))
        self.target.load_state_dict(self._online_target_state(), strict=True)
        self.target.requires_grad_(False)
        self._ema_pairs: Optional[tuple[list, list]] = None
        self.negatives = SyntheticNegatives(**(negatives or {})) if self.spec.uses_synthetic else None
        self.strategy = Strategy(**(strategy or {}))
        # Built last: its random initial keys come after the encoders' weights in the RNG stream.
        self.queue = KeyQueues(queue_size, proj_dim) if self.spec.uses_queue else None
        self.register_load_state_dict_pre_hook(_legacy_queue_keys)
        self._info_nce, self._byol_loss = info_nce, byol_loss

    def compile_target_and_loss(self) -> None:
        """``torch.compile`` the target encoder (in place, so the EMA still pairs its parameters by name) and the loss
        functions. The synthetic negatives stay eager: compiled, their random draws would come from inductor's own
        generator, and a compiled run would no longer replay an eager one."""
        self.target.compile()
        self._info_nce, self._byol_loss = torch.compile(info_nce), torch.compile(byol_loss)

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
                generator: Optional[torch.Generator] = None):
        """Loss of one batch of views ``x1``, ``x2`` ``[B, 3, H, W]`` through ``self.online``: :meth:`loss` of its
        predictions. (The trainer runs its DDP/compiled wrapper of ``online`` itself and then calls :meth:`loss`.)"""
        q1, q2 = self.online(x1, x2)
        return self.loss(q1, q2, x1, x2, use_synthetic=use_synthetic, generator=generator)

    def loss(self, q1: torch.Tensor, q2: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor,
             use_synthetic: bool = False, generator: Optional[torch.Generator] = None,
             labels: Optional[torch.Tensor] = None):
        """The method's loss of the online predictions against the target's keys of the other view.

        Args:
            q1, q2: ``[B, proj_dim]`` online predictions of views 1 and 2.
            x1, x2: the views ``[B, 3, H, W]``, which the target encoder embeds (without gradients).
            use_synthetic: add synthetic hard negatives (synco, inside its window of epochs).
            generator: the random stream of the synthetic negatives (default: torch's global one).
            labels: optional ``[B]`` classes of the images, for diagnostics only (never used by the loss).

        Returns:
            ``(loss, stats, (k1, k2))``: the symmetric loss (a scalar), detached statistics (scalars), and the
            normalised target keys ``[B, proj_dim]`` to enqueue (after gathering across processes) once the
            optimizer has stepped.
        """
        with torch.no_grad():
            k1, k2 = self.target(x1, x2)
        k1, k2 = F.normalize(k1.float(), dim=1), F.normalize(k2.float(), dim=1)
        if not self.uses_queue:
            l1, s1 = self._byol_loss(q1, k2)
            l2, s2 = self._byol_loss(q2, k1)
        else:
            q1, q2 = F.normalize(q1.float(), dim=1), F.normalize(q2.float(), dim=1)
            (l1, s1), (l2, s2) = self._contrastive(q1, q2, k1, k2, use_synthetic, generator, labels)
        stats = {key: (s1[key] + s2[key]) / 2 for key in s1}
        return l1 + l2, stats, (k1, k2)

    def _contrastive(self, q1, q2, k1, k2, use_synthetic: bool, generator, labels):
        """Each view's queries against the other view's key and queue: ``((l1, s1), (l2, s2))``. Suspected false
        negatives are found per direction from both views' keys (the two queues hold the two views of the same
        images in the same slots)."""
        st, queues = self.strategy, (self.queue.queue2, self.queue.queue1)
        keys = torch.stack([k1, k2])
        false_neg = [detect_false_negatives(keys, q, st.top_k, st.threshold) if st.detects_false_negatives
                     else None for q in queues]
        queue_labels = self.queue.labels if labels is not None else None
        out = []
        for q, k, queue, fn in zip((q1, q2), (k2, k1), queues, false_neg):
            syn = None
            if use_synthetic and self.negatives is not None:
                syn = self.negatives(q.detach(), queue, generator=generator,
                                     exclude=fn if st.filter_hard_set else None)
            slices = self.negatives.slices if self.negatives is not None else None
            out.append(self._info_nce(q, k, queue, self.temperature, syn, slices, strategy=st, false_neg=fn,
                                      labels=labels, queue_labels=queue_labels))
        return out

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
    def enqueue(self, k1: torch.Tensor, k2: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Enqueue the (globally gathered) keys ``[n, proj_dim]`` of both views, with their images' classes when
        known (diagnostics); nothing for methods without queues."""
        if self.queue is not None:
            self.queue.enqueue(k1, k2, labels)

    def _apply(self, fn, recurse=True):
        self._ema_pairs = None  # parameters may be replaced by .to()/.cuda()
        return super()._apply(fn, recurse)


def _legacy_queue_keys(module, state_dict, prefix, *args) -> None:
    rename_legacy_keys(state_dict, prefix)  # checkpoints from before KeyQueues load unchanged
