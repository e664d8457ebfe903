"""Backbones from timm: features, export loadable by timm itself, loading and mismatch errors."""

import pytest
import timm
import torch

from synco.errors import SyncoError
from synco.models.backbone import create_backbone, export_safetensors, load_backbone

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)


@pytest.mark.slow  # DeiT-S twice (ours, and timm's from the export): ~5 s on 2 busy cores
def test_deit_small_export_loads_in_timm_with_pretrained_overlay(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("deit_small_patch16_224").eval()
    path = tmp_path / "backbone.safetensors"
    export_safetensors(model, {"backbone": "deit_small_patch16_224", "backbone_kwargs": {}, "bn_before_mlp": False}, path)
    loaded = timm.create_model("deit_small_patch16_224", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)), num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert model.num_features == 384 and model.global_pool == "token"  # [CLS] features


def test_tiny_vit_export_roundtrip_and_load_backbone(tmp_path):
    model = create_backbone("vit_tiny_patch16_224", **TINY).eval()
    path = tmp_path / "b.safetensors"
    export_safetensors(model, {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": TINY, "bn_before_mlp": False}, path)
    again, meta = load_backbone(str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    assert meta["backbone_kwargs"] == TINY and meta["num_features"] == 48
    with pytest.raises(SyncoError, match="holds a 'vit_tiny_patch16_224' backbone"):
        load_backbone(str(path), backbone="deit_small_patch16_224")


def test_swin_features_are_global_average_pooled():
    m = create_backbone("swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                        window_size=7)
    assert m.global_pool == "avg"
    assert m(torch.randn(2, 3, 56, 56)).shape == (2, m.num_features)


def test_bad_backbones_and_files(tmp_path):
    with pytest.raises(SyncoError, match="cannot create backbone"):
        create_backbone("not_a_model")
    junk = tmp_path / "checkpoint.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SyncoError, match="cannot read"):
        load_backbone(str(junk))
    with pytest.raises(SyncoError, match="does not exist"):
        load_backbone(str(tmp_path / "missing.pt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SyncoError, match="neither"):
        load_backbone(str(empty))
    # weights of one architecture into another
    other = tmp_path / "other.safetensors"
    export_safetensors(create_backbone("vit_tiny_patch16_224", **TINY),
                       {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {**TINY, "depth": 3},
                        "bn_before_mlp": False}, other)
    with pytest.raises(SyncoError, match="does not match"):
        load_backbone(str(other))
