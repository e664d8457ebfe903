"""The linear classifier of `synco eval linear`, saved as one file other protocols reload.

File format (``linear_head.pt``, read with ``torch.load(weights_only=True)``):
``{"weight": [C, D], "bias": [C], "bn": bool, "bn_mean": [D] | None, "bn_var": [D] | None,
   "classes": [names], "backbone": meta dict, "image_size": int, "backbone_weights": hash | None}``.
``bn`` marks a parameter-free BatchNorm (affine=False) applied to features before the linear layer;
``backbone_weights`` is :func:`~synco.eval.common.weights_digest` of the backbone the head was trained on (absent
in files written before it was recorded).

Robustness and adversarial evaluation reload it on top of its backbone (:func:`load_classifier`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import SyncoError
from ..io import atomic_save, load_torch_file
from .common import EvalOptions, load_eval_backbone, weights_digest


class LinearHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, bn: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False) if bn else None
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            f = self.bn(f)
        return self.linear(f)


class Classifier(nn.Module):
    """backbone + linear head: the model robustness and adversarial evaluations attack."""

    def __init__(self, backbone: nn.Module, head: LinearHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def save_head(head: LinearHead, path: Path, classes: list, backbone_meta: dict, image_size: int,
              weights: Optional[str] = None) -> None:
    """Write ``linear_head.pt``; ``weights``: the backbone's weights hash, so the head is only reloaded on them."""
    atomic_save({
        "weight": head.linear.weight.detach().cpu(), "bias": head.linear.bias.detach().cpu(),
        "bn": head.bn is not None,
        "bn_mean": head.bn.running_mean.cpu() if head.bn is not None else None,
        "bn_var": head.bn.running_var.cpu() if head.bn is not None else None,
        "classes": list(classes), "backbone": dict(backbone_meta), "image_size": int(image_size),
        "backbone_weights": weights,
    }, path)


def load_head(path: str | Path, expect_dim: Optional[int] = None) -> tuple[LinearHead, dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "linear_head.pt"
    if not p.is_file():
        raise SyncoError(f"linear head '{path}' not found; train one with `synco eval linear` (it writes "
                         "linear_head.pt).")
    state = load_torch_file(p)  # its message never passes on torch's advice to unpickle arbitrary objects
    check_head_state(state, p)
    dim = state["weight"].shape[1]
    if expect_dim is not None and dim != expect_dim:
        raise SyncoError(f"linear head '{p}' expects {dim}-d features but the backbone gives {expect_dim}-d: "
                         "was it trained on another backbone?")
    return head_from_state(state), state


def check_head_state(state, path) -> None:
    """A head file as :func:`save_head` writes it: ``weight`` [C, D], ``bias`` [C], BatchNorm statistics [D] or
    None, all finite. Anything else would crash later or score with a head that predicts nothing."""
    def refuse(why: str):
        raise SyncoError(f"linear head '{path}' {why}; it is damaged or not written by `synco eval linear`. "
                         "Train it again with `synco eval linear`.")

    if not isinstance(state, dict):
        refuse("is not a mapping of tensors")
    weight, bias = state.get("weight"), state.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or 0 in weight.shape:
        refuse(f"has no 2-D 'weight' [classes, features] (got {_shape(weight)})")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
        refuse(f"has a 'bias' of shape {_shape(bias)}, not [{weight.shape[0]}]")
    tensors = {"weight": weight, "bias": bias}
    if state.get("bn_mean") is not None or state.get("bn_var") is not None:
        for key in ("bn_mean", "bn_var"):
            t = state.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (weight.shape[1],):
                refuse(f"has a '{key}' of shape {_shape(t)}, not [{weight.shape[1]}]")
            tensors[key] = t
    nonfinite = [k for k, t in tensors.items() if not bool(torch.isfinite(t.float()).all())]
    if nonfinite:
        refuse(f"holds values that are not finite (NaN or inf) in {', '.join(nonfinite)}: its training diverged, so "
               "every accuracy measured with it would be meaningless")


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def head_from_state(state: dict) -> LinearHead:
    """A :class:`LinearHead` in eval mode from ``weight`` [C, D], ``bias`` [C] and ``bn_mean``/``bn_var`` [D]
    (None: no BatchNorm)."""
    num_classes, dim = state["weight"].shape
    head = LinearHead(dim, num_classes, bn=state.get("bn_mean") is not None)
    with torch.no_grad():
        head.linear.weight.copy_(state["weight"])
        head.linear.bias.copy_(state["bias"])
        if head.bn is not None:
            head.bn.running_mean.copy_(state["bn_mean"])
            head.bn.running_var.copy_(state["bn_var"])
    return head.eval()


def check_head_weights(state: dict, head_path, checkpoint: str, backbone: nn.Module) -> None:
    """A head is a readout of the features of the weights it was trained on: on other weights of the same
    architecture (another run, seed or epoch) its accuracy means nothing, yet the shapes fit. The hash recorded by
    :func:`save_head` must be the evaluated backbone's; a head written before hashes were recorded is accepted
    with a warning."""
    recorded = state.get("backbone_weights")
    if recorded is None:
        warnings.warn(f"the linear head '{head_path}' does not record which backbone weights it was trained on "
                      f"(written by an older synco), so it cannot be checked against '{checkpoint}'; train it "
                      "again with `synco eval linear` to have it checked.", stacklevel=3)
        return
    current = weights_digest(backbone)
    if recorded != current:
        raise SyncoError(f"the linear head '{head_path}' was trained on other backbone weights than the checkpoint "
                         f"'{checkpoint}' holds (weights hash {str(recorded)[:12]}..., the checkpoint's "
                         f"{current[:12]}...): its accuracy there would mean nothing. Pass the "
                         "checkpoint the head was trained on, or train a head on this one with `synco eval linear "
                         f"--checkpoint {checkpoint}`.")


def load_classifier(checkpoint: str, head_path: str, opts: EvalOptions, device: torch.device):
    """(backbone + linear head in eval mode, head class names, image size, backbone meta, head file state)."""
    backbone, meta = load_eval_backbone(checkpoint, opts, device)
    head, state = load_head(head_path, expect_dim=int(backbone.num_features))
    check_head_weights(state, head_path, checkpoint, backbone)
    trained_on = (state.get("backbone") or {}).get("backbone")
    if trained_on and trained_on != meta.get("backbone"):
        warnings.warn(f"the linear head was trained on backbone '{trained_on}' but the checkpoint is "
                      f"'{meta.get('backbone')}'.", stacklevel=2)
    classes = [str(c) for c in state.get("classes") or range(head.linear.out_features)]
    size = int(opts.image_size or state.get("image_size") or 0)
    if not size:
        from ..models.backbone import input_size

        size = input_size(backbone)
    return Classifier(backbone, head).to(device).eval(), classes, size, meta, state
