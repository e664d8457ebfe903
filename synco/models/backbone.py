"""Backbones come from timm by name; this file only adds the papers' ablation switches and loading.

Features are timm's pooled output with ``num_classes=0``: the [CLS] token for DeiT/ViT
(``global_pool='token'``) and the global average pool for Swin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn

from ..errors import SyncoError
from ..io import atomic_write_bytes_with, load_torch_file

# The CPU demo backbone: a 4-block ViT on small images (timm's ViT with overridden sizes).
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=3)


class TokenBatchNorm(nn.Module):
    """BatchNorm over the channel (last) dim of token tensors [..., C]; the MoCo-v3 'BN before MLP' trick."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.bn(x.reshape(-1, shape[-1])).reshape(shape)


def _blocks(model: nn.Module):
    for module in model.modules():
        if hasattr(module, "norm2") and hasattr(module, "mlp"):
            yield module


def create_backbone(name: str, drop_path_rate: float = 0.0, bn_before_mlp: bool = False,
                    fixed_patch_embed: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model without classifier; ``model.num_features`` is the feature size."""
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError('Unknown model ...')
        raise SyncoError(f"cannot create backbone '{name}': {e}. Any timm ViT/Swin name works, "
                         "e.g. deit_small_patch16_224 or swin_tiny_patch4_window7_224.") from None
    except TypeError as e:
        raise SyncoError(f"backbone '{name}' does not accept model.backbone_kwargs={kwargs}: {e}") from None
    except (AssertionError, ValueError, ZeroDivisionError) as e:  # timm asserts on inconsistent sizes
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else "inconsistent sizes"
        raise SyncoError(f"backbone '{name}' cannot be built with model.backbone_kwargs={kwargs} ({why}); "
                         "check img_size, patch_size, window_size, embed_dim and num_heads.") from None
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and min(grid) < 1:
        raise SyncoError(f"backbone '{name}' with model.backbone_kwargs={kwargs} has no patches: its patch_size is "
                         "larger than its img_size. Use a smaller patch_size or a larger image size.")
    if bn_before_mlp:
        blocks = list(_blocks(model))
        if not blocks:
            raise SyncoError(f"model.bn_before_mlp=true needs transformer blocks with norm2/mlp; '{name}' has none.")
        for block in blocks:
            block.norm2 = TokenBatchNorm(block.norm2.normalized_shape[0])
    if fixed_patch_embed:
        patch = getattr(model, "patch_embed", None)
        if patch is None:
            raise SyncoError(f"model.fixed_patch_embed=true needs a patch_embed module; '{name}' has none.")
        for p in patch.parameters():
            p.requires_grad_(False)
    return model


def backbone_kwargs(model_cfg) -> dict:
    """:func:`create_backbone`'s arguments from the ``model`` section (timm's ``x_kwargs(cfg)`` + ``create_x(**kw)``
    pair); the drop-path rate is the caller's, because the online and target encoders differ in it."""
    return dict(name=model_cfg.backbone, bn_before_mlp=model_cfg.bn_before_mlp,
                fixed_patch_embed=model_cfg.fixed_patch_embed, **model_cfg.backbone_kwargs)


def backbone_from_config(model_cfg, drop_path_rate: float = 0.0) -> nn.Module:
    return create_backbone(**backbone_kwargs(model_cfg), drop_path_rate=drop_path_rate)


def input_size(model: nn.Module) -> int:
    """The square input size a backbone expects (timm records it in its pretrained_cfg)."""
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None):
        size = patch.img_size[-1] if isinstance(patch.img_size, (tuple, list)) else patch.img_size
    return int(size)


# ---------------------------------------------------------------------------------------------
# Loading a trained backbone from a run dir, a checkpoint or an exported safetensors file

META_KEY = "synco"
# Where a backbone that is not a timm architecture (model.bn_before_mlp=true) is exported: timm's loader
# must never see it as backbone.safetensors, which it would load with untrained LayerNorms.
SYNCO_ONLY_EXPORT = "backbone_synco.safetensors"


def backbone_meta(model_cfg) -> dict:
    return {"backbone": model_cfg.backbone, "backbone_kwargs": dict(model_cfg.backbone_kwargs),
            "bn_before_mlp": bool(model_cfg.bn_before_mlp)}


def export_safetensors(model: nn.Module, meta: dict, path: Path, synco_only: bool = False) -> None:
    """Save backbone weights so ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path), num_classes=0)`` loads them; ``meta`` rides in the header.

    A ``bn_before_mlp`` backbone is not a timm architecture (BatchNorm where timm has LayerNorm): timm
    would load it with untrained LayerNorms and only a warning, so it is refused unless ``synco_only``
    (a file for :func:`load_backbone`, named :data:`SYNCO_ONLY_EXPORT` by ``synco pretrain``)."""
    from safetensors.torch import save_file

    if meta.get("bn_before_mlp") and not synco_only:
        raise SyncoError("a model.bn_before_mlp=true backbone cannot be exported for timm: timm's "
                         f"{meta.get('backbone')} has LayerNorm before each MLP and would load this file with "
                         "untrained LayerNorms. Load it with synco.models.backbone.load_backbone(path) from "
                         f"{SYNCO_ONLY_EXPORT} or checkpoint.pt.")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes_with(path, lambda tmp: save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)}),
                            size=sum(t.numel() * t.element_size() for t in state.values()))


def _meta_from_safetensors(path: Path) -> Optional[dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise SyncoError(f"'{path}' has unreadable synco metadata (not JSON); re-export it, or give "
                         "backbone=NAME and strip the metadata.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("backbone"), str):
        raise SyncoError(f"'{path}' has synco metadata without a 'backbone' name; it was not written by "
                         "synco. Re-export it from its run (checkpoint.pt), or load it with timm directly.")
    kwargs = meta.get("backbone_kwargs", {})
    if not isinstance(kwargs, dict):
        raise SyncoError(f"'{path}': the synco metadata's backbone_kwargs is not a mapping.")
    meta["backbone_kwargs"] = kwargs
    return meta


def peek_meta(path: str) -> Optional[dict]:
    """The backbone name/kwargs of a run dir, checkpoint or export without building the model (cheap: the
    safetensors header, or a memory-mapped checkpoint); None for 'random' or a file without metadata."""
    if path == "random":
        return None
    p = _resolve_file(path)
    if p.suffix == ".safetensors":
        try:
            return _meta_from_safetensors(p)
        except SyncoError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SyncoError(f"cannot read '{p}' as safetensors: {e}") from None
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a full load gives the proper message
        ckpt = load_torch_file(p)
    return _meta_from_checkpoint(ckpt, p)


def _resolve_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in ("checkpoint.pt", "backbone.safetensors", SYNCO_ONLY_EXPORT):
            if (p / name).is_file():
                return p / name
        raise SyncoError(f"'{path}' holds neither checkpoint.pt nor backbone.safetensors.")
    if not p.is_file():
        raise SyncoError(f"checkpoint '{path}' does not exist.")
    return p


def _meta_from_checkpoint(ckpt, p: Path) -> dict:
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise SyncoError(f"'{p}' is not a synco pretraining checkpoint (no config/model entries).")
    try:
        mcfg = ckpt["config"]["model"]
        return {"backbone": mcfg["backbone"], "backbone_kwargs": dict(mcfg["backbone_kwargs"]),
                "bn_before_mlp": bool(mcfg["bn_before_mlp"]), "method": ckpt["config"]["method"],
                "epoch": ckpt.get("epoch")}
    except (KeyError, TypeError, ValueError):
        raise SyncoError(f"'{p}' is not a synco pretraining checkpoint (its config has no model section).") from None


def _online_backbone_state(state: dict) -> dict:
    prefix = "online.backbone."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_backbone(path: str, backbone: Optional[str] = None, backbone_kwargs: Optional[dict] = None,
                  device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Return (backbone in eval mode, meta) from a run directory, its ``checkpoint.pt``, an exported
    ``backbone.safetensors``, or the word ``random`` (untrained; needs ``backbone``)."""
    meta: Optional[dict] = None
    state: Optional[dict] = None
    if path == "random":
        if not backbone:
            raise SyncoError("--checkpoint random needs a backbone name (backbone=deit_small_patch16_224).")
        meta = {"backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}), "bn_before_mlp": False}
    else:
        p = _resolve_file(path)
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                state = load_file(str(p))
                meta = _meta_from_safetensors(p)
            except SyncoError:
                raise
            except Exception as e:  # noqa: BLE001
                raise SyncoError(f"cannot read '{p}' as safetensors: {e}") from None
            if meta is None:
                if not backbone:
                    raise SyncoError(f"'{p}' carries no synco metadata; give backbone=NAME.")
                meta = {"backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}), "bn_before_mlp": False}
        else:
            ckpt = load_torch_file(p)
            meta = _meta_from_checkpoint(ckpt, p)
            state = _online_backbone_state(ckpt["model"])
        if backbone and backbone != meta["backbone"]:
            raise SyncoError(f"checkpoint '{path}' holds a '{meta['backbone']}' backbone, but backbone={backbone} was "
                             "asked for.")
    model = create_backbone(meta["backbone"], bn_before_mlp=meta.get("bn_before_mlp", False), **meta["backbone_kwargs"])
    if state is not None:
        load_state_checked(model, state, f"checkpoint '{path}'", meta["backbone"])
        check_finite_state(state, f"checkpoint '{path}'")
    meta["source"] = str(path)
    meta["num_features"] = int(model.num_features)
    return model.to(device).eval(), meta


def load_state_checked(model: nn.Module, state: dict, what: str, arch: str) -> None:
    """``load_state_dict`` with a short message instead of a page of missing/unexpected keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise SyncoError(f"{what} does not match the '{arch}' architecture (another backbone or other "
                         f"model settings?): {' '.join(first)[:400]}") from None


def check_finite_state(state: dict, what: str) -> None:
    """Refuse weights holding NaN or inf: every number computed from them would be meaningless, yet a k-NN or a
    probe on them still runs and reports one (ties at chance level)."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise SyncoError(f"{what} holds non-finite weights (NaN or inf) in {shown}: the training diverged or the "
                         "file is damaged, and any number measured on it would be meaningless. Evaluate an earlier "
                         "checkpoint, or re-train with a lower learning rate.")
