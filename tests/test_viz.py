"""Attention / Grad-CAM / saliency maps, their metrics, the PNG grid and `synco visualize`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from synco.cli.main import main
from synco.errors import SyncoError
from synco.eval.head import LinearHead
from synco.models.backbone import create_backbone, export_safetensors
from synco.viz.attention import capture_attention, has_global_attention, threshold_mass, upsample, vit_attention
from synco.viz.figure import HEAT, MASK, Column, grid_figure
from synco.viz.images import DEFAULT_IMAGE_NAMES, load_images, load_masks, masks_to_model_geometry, to_model_input
from synco.viz.metrics import attention_entropy, centre_box_mask, entropy, mask_fraction, row_entropy
from synco.viz.saliency import grad_cam, gradient_saliency

VIT = "vit_tiny_patch16_224"
VIT_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 4x4 patch grid
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KW = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)


def tiny_vit(**over):
    return create_backbone(VIT, **{**VIT_KW, **over}).eval()


def tiny_swin():
    return create_backbone(SWIN, **SWIN_KW).eval()


# ---------------------------------------------------------------------------------------------
# ViT attention


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True, "reg_tokens": 1}])
def test_recomputed_attention_equals_timm_unfused(extra):
    model = tiny_vit(**extra)
    x = torch.randn(2, 3, 32, 32)
    ours = capture_attention(model, x)
    attn = model.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path materialises softmax(qk^T) before attn_drop
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    n = 17 + extra.get("reg_tokens", 0)
    assert ours.shape == (2, 2, n, n)
    torch.testing.assert_close(ours, seen[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_attention_map_shapes_and_normalisation(reg_tokens):
    model = tiny_vit(reg_tokens=reg_tokens)
    am = vit_attention(model, torch.randn(3, 3, 32, 32))
    assert am.num_prefix == 1 + reg_tokens and am.grid == (4, 4)
    assert am.attn.shape == (3, 2, 16 + 1 + reg_tokens, 16 + 1 + reg_tokens)
    torch.testing.assert_close(am.attn.sum(-1), torch.ones(3, 2, 17 + reg_tokens))
    for grid_map, shape in ((am.cls_heads, (3, 2, 4, 4)), (am.patch_heads, (3, 2, 4, 4)),
                            (am.cls, (3, 4, 4)), (am.patch, (3, 4, 4))):
        assert grid_map.shape == shape
        assert (grid_map >= 0).all()
        torch.testing.assert_close(grid_map.sum((-2, -1)), torch.ones(shape[:-2]))
    for img in (am.cls_image(), am.patch_image()):
        assert img.shape == (3, 32, 32)
        assert img.min() >= 0 and img.max() <= 1
        torch.testing.assert_close(img.amax((-2, -1)), torch.ones(3))
    th = am.cls_threshold(0.6)
    assert th.shape == (3, 32, 32) and th.dtype == torch.bool and th.any()


def _cls_looks_at(model, patch: int, strength: float = 40.0) -> None:
    """Rig a 1-block ViT so every query (the [CLS] included) attends to one patch only.

    Tokens entering the block are constant (zero patch embedding and [CLS]/register tokens) except the
    chosen patch, whose position embedding is a one-hot; queries are a constant vector aligned with that
    patch's normalised token (in every head), keys are the normalised tokens themselves."""
    blk = model.blocks[0]
    dim, heads = model.embed_dim, blk.attn.num_heads
    hd = dim // heads
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.cls_token.zero_()
        if getattr(model, "reg_token", None) is not None:
            model.reg_token.zero_()
        model.pos_embed.zero_()
        offset = model.pos_embed.shape[1] - model.patch_embed.num_patches
        e = torch.zeros(1, 1, dim)
        e[0, 0, ::hd] = 10.0  # the first channel of every head
        model.pos_embed[0, offset + patch] = e[0, 0]
        target = blk.norm1(e)[0, 0]  # the chosen patch's token as the attention sees it (others -> 0)
        w = torch.zeros(3 * dim, dim)
        b = torch.zeros(3 * dim)
        b[:dim] = strength * (target.view(heads, hd) / target.view(heads, hd).norm(dim=1, keepdim=True)).flatten()
        w[dim:2 * dim] = torch.eye(dim)  # key = token
        blk.attn.qkv.weight.copy_(w)
        blk.attn.qkv.bias.copy_(b)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_constructed_attention_peaks_at_the_chosen_patch(reg_tokens):
    model = tiny_vit(depth=1, reg_tokens=reg_tokens)
    patch = 6  # row 1, column 2 of the 4x4 grid
    _cls_looks_at(model, patch)
    am = vit_attention(model, torch.randn(2, 3, 32, 32))
    cls = am.cls.flatten(1)
    assert (cls.argmax(1) == patch).all()
    assert (cls[:, patch] > 0.99).all()
    assert (am.cls_heads.flatten(2)[..., patch] > 0.99).all()  # every head
    # upsampled map: maximal inside that patch's 8x8 pixels (rows 8-15, columns 16-23)
    img = am.cls_image()
    assert img[:, 11:13, 19:21].min() > 0.9 and img[:, 8:16, 16:24].mean() > 0.6 and img[:, :, :8].max() < 0.1
    # thresholded view keeps exactly that patch
    th = am.cls_threshold(0.6)
    assert th[:, 8:16, 16:24].all() and th.sum() == 2 * 64
    # patch self-attention: the other patches all attend to it too
    assert (am.patch.flatten(1).argmax(1) == patch).all()
    assert attention_entropy(am.cls).max() < 0.1


def test_threshold_mass_keeps_top_fraction():
    m = torch.tensor([[0.1, 0.5], [0.3, 0.1]])
    assert threshold_mass(m, 0.5).tolist() == [[False, True], [False, False]]
    assert threshold_mass(m, 0.6).tolist() == [[False, True], [True, False]]
    assert threshold_mass(m, 1.0).all()
    with pytest.raises(SyncoError):
        threshold_mass(m, 0.0)


def test_upsample_is_bilinear_and_rescaled():
    g = torch.zeros(1, 2, 2)
    g[0, 0, 0] = 1.0
    up = upsample(g, 8)
    assert up.shape == (1, 8, 8) and up[0, 0, 0] == 1 and up[0, -1, -1] == 0
    assert 0 < up[0, 3, 3] < 1  # interpolated, not nearest


# ---------------------------------------------------------------------------------------------
# Metrics


def test_entropy_uniform_is_log_n_and_one_hot_is_zero():
    u = torch.full((2, 3, 4, 4), 1 / 16)
    torch.testing.assert_close(attention_entropy(u), torch.full((2, 3), math.log(16)))
    one = torch.zeros(4, 4)
    one[1, 2] = 1
    assert attention_entropy(one).item() == 0.0
    attn = torch.full((1, 2, 5, 5), 0.2)  # 1 prefix + 4 patches, uniform
    torch.testing.assert_close(row_entropy(attn, num_prefix=1), torch.full((1, 2), math.log(4)))
    torch.testing.assert_close(entropy(torch.tensor([1.0, 1.0])), torch.tensor(math.log(2)))


def test_mask_fraction_known_cases():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :8] = True  # left half
    assert mask_fraction(torch.full((4, 4), 1 / 16), mask).item() == pytest.approx(0.5)
    g = torch.zeros(4, 4)
    g[0, 0] = 1.0
    assert mask_fraction(g, mask).item() == pytest.approx(1.0)
    g = torch.zeros(4, 4)
    g[0, 3] = 1.0
    assert mask_fraction(g, mask).item() == pytest.approx(0.0)
    half = torch.zeros(16, 16, dtype=torch.bool)
    half[:, :2] = True  # covers half of patch column 0 (patches are 4 px wide)
    g = torch.zeros(4, 4)
    g[2, 0] = 1.0
    assert mask_fraction(g, half).item() == pytest.approx(0.5)
    # image-resolution maps and per-image masks broadcast over the batch
    maps = torch.rand(3, 16, 16)
    fr = mask_fraction(maps, mask.expand(3, 16, 16))
    torch.testing.assert_close(fr, maps[:, :, :8].sum((-2, -1)) / maps.sum((-2, -1)))
    box = centre_box_mask(16, 16, 0.5)
    assert box.sum() == 64 and box[4:12, 4:12].all()


# ---------------------------------------------------------------------------------------------
# Grad-CAM and saliency


def test_gradcam_and_saliency_on_tiny_swin():
    model = tiny_swin()
    assert not has_global_attention(model)
    with pytest.raises(SyncoError):
        vit_attention(model, torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    head = LinearHead(model.num_features, 5).eval()
    for fn in (grad_cam, gradient_saliency):
        for h in (None, head):
            m, pred = fn(model, x, head=h, return_classes=True)
            assert m.shape == (2, 32, 32)
            assert m.min() >= 0 and m.max() <= 1 and torch.isfinite(m).all()
            torch.testing.assert_close(m.amax((-2, -1)), torch.ones(2))
            assert (pred is None) == (h is None)
            if h is not None:
                assert pred.shape == (2,) and pred.max() < 5
    assert all(p.grad is None for p in model.parameters())  # model untouched


def test_gradcam_on_vit_uses_patch_tokens_and_saliency_is_local():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    cam = grad_cam(model, x)
    assert cam.shape == (2, 32, 32) and cam.max() > 0
    # saliency: a patch that cannot influence the features has zero gradient there
    with torch.no_grad():
        model.patch_embed.proj.weight[:, :, :, :] = 0.0  # no pixel reaches the tokens ...
        model.patch_embed.proj.weight[:, 0, 0, 0] = 1.0  # ... except the red top-left pixel of each patch
    sal = gradient_saliency(model, x)
    assert sal[:, 0::8, 0::8].min() > 0
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[0::8, 0::8] = False
    assert sal[:, mask].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# Images and figure


def test_default_images_offline_and_geometry(tmp_path):
    photos = load_images(None)
    assert [p.name for p in photos] == list(DEFAULT_IMAGE_NAMES)
    assert all(p.image.dtype == np.uint8 and p.image.ndim == 3 and p.image.shape[2] == 3 for p in photos)
    # a wide image, left third red: the mask of that third lands on the red pixels after resize + crop
    img = np.zeros((40, 120, 3), np.uint8)
    img[:, :50, 0] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    Image.fromarray((img[..., 0] > 0).astype(np.uint8) * 255).save(tmp_path / "wide_mask.png")
    images = load_images(tmp_path / "wide.png")
    x = to_model_input(images, 16)
    assert x.shape == (1, 3, 16, 16)
    fg = masks_to_model_geometry(load_masks(tmp_path / "wide_mask.png", images), 16)
    red = x[0, 0] > x[0, 0].mean()
    assert fg.shape == (1, 16, 16) and (fg[0] == red).float().mean() > 0.9
    with pytest.raises(SyncoError):
        load_images(tmp_path / "missing")


def test_png_is_written_and_not_blank(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((2, 16, 16, 3))
    maps = torch.rand(2, 16, 16)
    cols = [Column("a", maps, notes=["H=1", "H=2"]), Column("b", None)]
    path = grid_figure(tmp_path / "f.png", images, cols, ["x", "y"], kind=HEAT, title="t")
    png = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert png.shape[0] > 100 and png.shape[1] > 150
    assert png.std() > 20  # not a blank canvas
    path = grid_figure(tmp_path / "m.png", images, [Column("a", maps > 0.5)], ["x", "y"], kind=MASK)
    assert np.asarray(Image.open(path).convert("L")).astype(float).std() > 10


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run dir with an exported tiny ViT backbone, and a folder of two small photos."""
    root = tmp_path_factory.mktemp("viz")
    torch.manual_seed(0)
    model = create_backbone(VIT, **VIT_KW)
    run = root / "run"
    run.mkdir()
    export_safetensors(model, {"backbone": VIT, "backbone_kwargs": VIT_KW, "bn_before_mlp": False},
                       run / "backbone.safetensors")
    (run / "config.yaml").write_text("method: moby\n")
    images = root / "images"
    images.mkdir()
    for p in load_images(None)[:2]:
        Image.fromarray(p.image).resize((48, 40)).save(images / f"{p.name}.png")
    return run, images


def test_cli_end_to_end_vit_vs_random(tiny_run, tmp_path, capsys):
    run, images = tiny_run
    out = tmp_path / "out"
    kw = json.dumps(VIT_KW)
    rc = main(["visualize", "--checkpoint", str(run), "--checkpoint", "random", "--images", str(images),
               "--out", str(out), f"backbone={VIT}", f"backbone_kwargs={kw}", "views=cls,threshold,gradcam",
               "threshold=0.5", "device=cpu"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert [c["label"] for c in summary["checkpoints"]] == ["moby (run)", "random init"]
    for name in ("cls_attention.png", "cls_threshold.png", "gradcam.png"):
        png = np.asarray(Image.open(out / name).convert("RGB")).astype(float)
        assert png.std() > 20
    assert not (out / "saliency.png").exists()
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == list(DEFAULT_IMAGE_NAMES[:2]) and report["image_size"] == 32
    assert report["mask_area_fraction"] == pytest.approx(0.25)
    for c in report["checkpoints"]:
        assert len(c["cls_entropy_per_head"]) == 2 and c["num_patches"] == 16
        assert 0 < c["cls_entropy_mean"] <= math.log(16) + 1e-6
        assert 0 <= c["cls_mask_fraction"] <= 1 and 0 <= c["gradcam_mask_fraction"] <= 1
        assert len(c["per_image"]) == 2


def test_cli_mixes_swin_and_vit_with_mask(tiny_run, tmp_path, capsys):
    run, images = tiny_run
    mask = tmp_path / "mask.png"
    m = np.zeros((40, 48), np.uint8)
    m[:, :24] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "out"
    kw = json.dumps({**SWIN_KW, "depths": list(SWIN_KW["depths"]), "num_heads": list(SWIN_KW["num_heads"])})
    rc = main(["visualize", "--checkpoint", "random", "--checkpoint", str(run), "--images", str(images),
               "--mask", str(mask), "--out", str(out), f"backbone={SWIN}", f"backbone_kwargs={kw}",
               "views=patch,saliency", "--label", "swin", "--label", "vit", "device=cpu"])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    swin, vit = report["checkpoints"]
    assert swin["label"] == "swin" and not swin["attention"] and "patch_mask_fraction" not in swin
    assert vit["attention"] and "patch_mask_fraction" in vit
    assert "saliency_mask_fraction" in swin and "saliency_mask_fraction" in vit
    assert report["mask_area_fraction"] == pytest.approx(0.5, abs=0.05)
    assert (out / "patch_attention.png").exists() and (out / "saliency.png").exists()


def test_cli_user_errors_exit_2(tiny_run, tmp_path, capsys):
    run, images = tiny_run
    assert main(["visualize", "--checkpoint", str(run), "--images", str(images), "--out", str(tmp_path),
                 "views=cls,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["visualize", "--checkpoint", str(run), "--images", str(tmp_path / "nope"),
                 "--out", str(tmp_path)]) == 2
    assert main(["visualize", "--checkpoint", "random", "--out", str(tmp_path)]) == 2
