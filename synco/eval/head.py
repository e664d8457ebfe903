"""The linear classifier of `synco eval linear`, saved as one file other protocols reload.

File format (``linear_head.pt``, read with ``torch.load(weights_only=True)``):
``{"weight": [C, D], "bias": [C], "bn": bool, "bn_mean": [D] | None, "bn_var": [D] | None,
   "classes": [names], "backbone": meta dict, "image_size": int}``.
``bn`` marks a parameter-free BatchNorm (affine=False) applied to features before the linear layer.

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
from .common import EvalOptions, load_eval_backbone


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


def save_head(head: LinearHead, path: Path, classes: list, backbone_meta: dict, image_size: int) -> None:
    atomic_save({
        "weight": head.linear.weight.detach().cpu(), "bias": head.linear.bias.detach().cpu(),
        "bn": head.bn is not None,
        "bn_mean": head.bn.running_mean.cpu() if head.bn is not None else None,
        "bn_var": head.bn.running_var.cpu() if head.bn is not None else None,
        "classes": list(classes), "backbone": dict(backbone_meta), "image_size": int(image_size),
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


def load_classifier(checkpoint: str, head_path: str, opts: EvalOptions, device: torch.device):
    """(backbone + linear head in eval mode, head class names, image size, backbone meta, head file state)."""
    backbone, meta = load_eval_backbone(checkpoint, opts, device)
    head, state = load_head(head_path, expect_dim=int(backbone.num_features))
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
