"""Batched device augmentation (synco.data.batch_augment): random numbers, per-op numerics against torchvision,
determinism under any batch split, and the same parameter distributions as the per-image path (Table 11)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import kornia.enhance as KE
import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from synco.config import AugmentConfig
from synco.data import batch_augment as BA
from synco.data.batch_augment import BatchViews, ViewDraw, resized_crop, sample_seeds, uniforms
from synco.data.transforms import (
    BYOL_T,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AugmentationParams,
    blur_kernel_size,
    byol_transforms,
    view_params,
)
from synco.errors import SyncoError

BICUBIC = v2.InterpolationMode.BICUBIC
P_FLOOR = 1e-3  # p-value below which a same-distribution test fails (all draws are seeded: no flakiness)


# ----------------------------------------------------------------------------------------------------------- RNG

def _splitmix_ref(x: int) -> int:
    m = (1 << 64) - 1
    x &= m
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_mix64_is_splitmix64_bit_for_bit():
    vals = [0, 1, -1, 7, 2**62 + 12345, -(2**63), 2**63 - 1, 123456789123]
    got = BA.mix64(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert [g % 2**64 for g in got] == [_splitmix_ref(v) for v in vals]
    # and the uniform of (seed, k) is the reference stream, computed for a batch at once
    seeds, ks = [3, -5, 2**40], [0, 1, 63]
    u = uniforms(torch.tensor(seeds), torch.tensor(ks))
    gamma = 0x9E3779B97F4A7C15
    for i, s in enumerate(seeds):
        for j, k in enumerate(ks):
            z = _splitmix_ref(_splitmix_ref(s) + (k + 1) * gamma)
            assert u[i, j].item() == (z >> 11) * 2.0 ** -53


def test_uniforms_are_uniform_and_independent():
    u = uniforms(torch.arange(4000), torch.arange(16)).numpy()
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u.ravel(), "uniform").pvalue > P_FLOOR
    # neighbouring seeds and neighbouring slots are uncorrelated
    corr = np.corrcoef(u.T)
    assert np.abs(corr[~np.eye(16, dtype=bool)]).max() < 0.07
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.07
    # a 10x10 grid of consecutive pairs is filled evenly
    cells = np.floor(u[:, :2] * 10).astype(int)
    counts = np.bincount(cells[:, 0] * 10 + cells[:, 1], minlength=100)
    assert stats.chisquare(counts).pvalue > P_FLOOR


def test_sample_seeds_distinct_and_deterministic():
    a = sample_seeds(0, 0, torch.arange(2000))
    assert torch.equal(a, sample_seeds(0, 0, list(range(2000))))
    keys = torch.cat([sample_seeds(s, e, torch.arange(3000)) for s in (0, 1) for e in range(4)])
    assert keys.unique().numel() == keys.numel()
    # IndexSeeded's linear key collides for (epoch + 1, i) and (epoch, i + 1_000_033); this hash does not
    assert sample_seeds(0, 1, [5]).item() != sample_seeds(0, 0, [5 + 1_000_033]).item()


# ------------------------------------------------------------------------------------------------ op numerics

@pytest.mark.parametrize("hw,box,size", [((40, 30), (3, 5, 31, 17), 16),  # downscale (antialias)
                                         ((40, 30), (10, 2, 9, 7), 24),  # upscale
                                         ((16, 16), (0, 0, 16, 16), 16)])  # identity
def test_resized_crop_matches_torchvision(hw, box, size):
    torch.manual_seed(1)
    img = torch.rand(2, 3, *hw)
    boxes = torch.tensor([box, box])
    out = resized_crop(img, boxes, torch.tensor([False, True]), size)
    ref = TF.resized_crop(img[0], *box, [size, size], interpolation=BICUBIC, antialias=True).clamp(0, 1)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], TF.horizontal_flip(
        TF.resized_crop(img[1], *box, [size, size], interpolation=BICUBIC, antialias=True).clamp(0, 1)),
        atol=1e-5, rtol=0)
    if box == (0, 0, *hw):
        torch.testing.assert_close(out[0], img[0], atol=1e-6, rtol=0)


def _draw(B, size, **kw) -> ViewDraw:
    """A hand-made draw: whole-image box, nothing applied unless set."""
    d = dict(box=torch.tensor([[0, 0, size, size]] * B), flip=torch.zeros(B, dtype=torch.bool),
             jitter=torch.zeros(B, dtype=torch.bool), factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * B,
                                                                         dtype=torch.float64),
             order=torch.tensor([[0, 1, 2, 3]] * B), gray=torch.zeros(B, dtype=torch.bool),
             blur=torch.zeros(B, dtype=torch.bool), sigma=torch.ones(B, dtype=torch.float64),
             solarize=torch.zeros(B, dtype=torch.bool))
    d.update({k: torch.as_tensor(v) for k, v in kw.items()})
    return ViewDraw(**d)


def _unnorm(y):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(-1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(-1, 3, 1, 1)
    return y * std + mean


ALL_ON = AugmentationParams(flip_p=0.5, color_jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.2)
JITTER_ONE = dict(brightness=(1.3, 1.0, 1.0, 0.0), contrast=(1.0, 0.7, 1.0, 0.0),
                  saturation=(1.0, 1.0, 1.15, 0.0), hue=(1.0, 1.0, 1.0, 0.07))
TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@pytest.fixture(scope="module")
def colour_image():
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 12, 12, generator=g)


@pytest.mark.parametrize("op", list(JITTER_ONE))
def test_jitter_op_matches_torchvision(colour_image, op):
    """Each jitter op alone with a fixed factor, against torchvision's functional on the same float image.
    contrast and saturation blend with kornia's luma (0.299 R) where torchvision uses 0.2989 R: <= 5e-5."""
    k = list(JITTER_ONE).index(op)
    f = JITTER_ONE[op]
    bv = BatchViews(12, (ALL_ON, ALL_ON))
    out = _unnorm(bv.apply_view(colour_image, ALL_ON, _draw(1, 12, jitter=[True], factors=[f])))
    ref = TV_JITTER[k](colour_image[0], f[k])
    tol = {"brightness": 1e-6, "hue": 1e-5}.get(op, 6e-5)
    torch.testing.assert_close(out[0], ref, atol=tol, rtol=0)
    assert (out[0] - colour_image[0]).abs().max() > 0.01  # the op did something


def test_jitter_order_is_per_sample(colour_image):
    """Two samples, same factors, two different orders: each equals torchvision applied in its own order."""
    f = (1.3, 0.7, 1.4, 0.1)
    x = colour_image.expand(2, -1, -1, -1).contiguous()
    orders = [[3, 0, 2, 1], [1, 2, 0, 3]]
    bv = BatchViews(12, (ALL_ON, ALL_ON))
    out = _unnorm(bv.apply_view(x, ALL_ON, _draw(2, 12, jitter=[True, True], factors=[f, f], order=orders)))
    for b, order in enumerate(orders):
        ref = colour_image[0]
        for k in order:
            ref = TV_JITTER[k](ref, f[k])
        torch.testing.assert_close(out[b], ref, atol=1e-4, rtol=0)
    assert (out[0] - out[1]).abs().max() > 0.01


KORNIA_JITTER = (KE.adjust_brightness_accumulative, KE.adjust_contrast_with_mean_subtraction,
                 KE.adjust_saturation_with_gray_subtraction, KE.adjust_hue)


def test_fused_jitter_is_kornia_op_by_op_bit_for_bit():
    """The jitter blends brightness, contrast and saturation in one pass per round: each sample must still get
    exactly kornia's ops one at a time, in its own order, the off ones (jitter not drawn, strength 0) untouched."""
    g = torch.Generator().manual_seed(11)
    B, size = 48, 10
    x = torch.rand(B, 3, size, size, generator=g)
    x[:8, 1:] = x[:8, :1]  # some grey images
    views = (BYOL_T, dataclasses.replace(BYOL_T, hue=0.0, brightness=0.0))  # view 2 jitters only c and s
    bv = BatchViews(size, views)
    for view, p in enumerate(views):
        d = bv.draw(sample_seeds(3, view, torch.arange(B)), size, size)[view]
        d = dataclasses.replace(d, box=torch.tensor([[0, 0, size, size]] * B), flip=torch.zeros(B, dtype=torch.bool),
                                gray=torch.zeros(B, dtype=torch.bool), blur=torch.zeros(B, dtype=torch.bool),
                                solarize=torch.zeros(B, dtype=torch.bool))
        out = _unnorm(bv.apply_view(x, p, d))
        crop = resized_crop(x, d.box, d.flip, size)  # the same float image the jitter starts from
        strengths = (p.brightness, p.contrast, p.saturation, p.hue)
        for b in range(B):
            ref = crop[b:b + 1]
            for k in d.order[b].tolist() if d.jitter[b] else []:
                if strengths[k] > 0:
                    f = d.factors[b:b + 1, k]
                    ref = KORNIA_JITTER[k](ref, (f * (2 * math.pi) if k == 3 else f).to(torch.float32))
            assert torch.equal(out[b:b + 1], _unnorm(bv.apply_view(ref, dataclasses.replace(
                p, color_jitter_p=0.0), _draw(1, size)))), (view, b)
        assert d.jitter.any() and not d.jitter.all()


def test_both_views_at_once_equal_one_view_at_a_time():
    """forward() runs both views as one batch of 2B: the same numbers as applying each view on its own."""
    x = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    views = (BYOL_T, dataclasses.replace(BYOL_T, hue=0.0, flip_p=0.0, blur_p=0.3, solarize_p=0.5))
    bv = BatchViews(16, views)
    seeds = sample_seeds(1, 2, torch.arange(16))
    x1, x2 = bv(x, seeds)
    d1, d2 = bv.draw(seeds, 20, 20)
    assert torch.equal(x1, bv.apply_view(x.float() / 255, views[0], d1))
    assert torch.equal(x2, bv.apply_view(x.float() / 255, views[1], d2))


def test_grayscale_blur_solarize_flip_normalise_match_torchvision(colour_image):
    size = 12
    bv = BatchViews(size, (ALL_ON, ALL_ON))
    x = colour_image
    ks = blur_kernel_size(size)
    cases = {
        "gray": (dict(gray=[True]), lambda im: TF.rgb_to_grayscale(im, num_output_channels=3)),
        "blur": (dict(blur=[True], sigma=[1.3]), lambda im: TF.gaussian_blur(im, [ks, ks], [1.3, 1.3])),
        "solarize": (dict(solarize=[True]), lambda im: TF.solarize(im, 0.5)),
        "flip": (dict(flip=[True]), TF.horizontal_flip),
        "none": ({}, lambda im: im),
    }
    for name, (kw, tv) in cases.items():
        y = bv.apply_view(x, ALL_ON, _draw(1, size, **kw))
        ref = TF.normalize(tv(x[0]), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        torch.testing.assert_close(y[0], ref, atol=1e-5, rtol=0, msg=name)
    # sigma 0.3 and 2.0 too (blur kernel ks = 3 at size 12: nearly identity vs strong)
    for s in (0.3, 2.0):
        y = _unnorm(bv.apply_view(x, ALL_ON, _draw(1, size, blur=[True], sigma=[s])))
        torch.testing.assert_close(y[0], TF.gaussian_blur(x[0], [ks, ks], [s, s]), atol=1e-5, rtol=0)


def test_full_chain_matches_torchvision_order():
    """crop -> flip -> jitter -> gray -> blur -> solarise -> normalise, against the same chain of torchvision
    functionals (float image, i.e. the per-image path without its uint8 rounding between ops)."""
    torch.manual_seed(4)
    x = torch.rand(1, 3, 20, 18)
    box, f, order, sigma = (2, 3, 15, 13), (0.8, 1.2, 0.9, -0.05), [2, 3, 1, 0], 0.9
    size = 16
    bv = BatchViews(size, (ALL_ON, ALL_ON))
    d = _draw(1, size, box=[box], flip=[True], jitter=[True], factors=[f], order=[order], gray=[False],
              blur=[True], sigma=[sigma], solarize=[True])
    y = bv.apply_view(x, ALL_ON, d)
    ref = TF.resized_crop(x[0], *box, [size, size], interpolation=BICUBIC, antialias=True).clamp(0, 1)
    ref = TF.horizontal_flip(ref)
    for k in order:
        ref = TV_JITTER[k](ref, f[k])
    ks = blur_kernel_size(size)
    ref = TF.solarize(TF.gaussian_blur(ref, [ks, ks], [sigma, sigma]), 0.5)
    ref = TF.normalize(ref, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(y[0], ref, atol=5e-4, rtol=0)


def test_crop_fallback_matches_torchvision():
    """No attempt fits (scale > 1): both take the central crop with the ratio clamped."""
    p = dataclasses.replace(BYOL_T, crop_scale=(1.5, 2.0))
    for h, w in [(8, 20), (20, 8), (12, 12)]:
        ours = BA.draw_view(p, torch.arange(5), 0, h, w).box
        tv = v2.RandomResizedCrop(8, scale=(1.5, 2.0), ratio=p.crop_ratio).make_params(
            [torch.zeros(3, h, w, dtype=torch.uint8)])
        expect = torch.tensor([tv["top"], tv["left"], tv["height"], tv["width"]])
        assert (ours == expect).all(), (h, w, ours[0], expect)


# -------------------------------------------------------------------------------------- determinism and API

def test_outputs_shape_dtype_finite_and_fast_path():
    bv = BatchViews.from_config(AugmentConfig(), 16)
    x = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    x1, x2 = bv(x, sample_seeds(0, 0, torch.arange(6)))
    for y in (x1, x2):
        assert y.shape == (6, 3, 16, 16) and y.dtype == torch.float32 and y.device == x.device
        assert torch.isfinite(y).all()
    # float input in [0, 1] gives the same views as uint8
    f1, f2 = bv(x.float() / 255, sample_seeds(0, 0, torch.arange(6)))
    torch.testing.assert_close(f1, x1)
    torch.testing.assert_close(f2, x2)  # its own statement: assert_close returns None
    # every probability 0: the views are the normalised resized crops
    off = AugmentationParams(flip_p=0, color_jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    plain = BatchViews(16, (off, off))
    seeds = torch.arange(6)
    y1, _ = plain(x, seeds)
    d = plain.draw(seeds, 20, 20)[0]
    crop = resized_crop(x.float() / 255, d.box, torch.zeros(6, dtype=torch.bool), 16)
    torch.testing.assert_close(_unnorm(y1), crop, atol=1e-6, rtol=0)
    with pytest.raises(SyncoError):
        bv(x, torch.arange(5))
    with pytest.raises(SyncoError):
        BatchViews(16, (dataclasses.replace(BYOL_T, crop_p=0.5), BYOL_T))


def test_from_config_reads_data_augment():
    cfg = AugmentConfig(blur_p=[0.5, 0.0], solarize_p=[0.1, 0.3], jitter=[0.2, 0.1, 0.0, 0.0])
    bv = BatchViews.from_config(cfg, 32)
    assert bv.views == view_params(cfg)
    assert bv.views[0].blur_p == 0.5 and bv.views[1].solarize_p == 0.3 and bv.views[0].saturation == 0.0
    assert bv.kernel_size == blur_kernel_size(32)


def test_deterministic_and_independent_of_batch_composition():
    torch.manual_seed(5)
    B = 12
    x = torch.randint(0, 256, (B, 3, 24, 24), dtype=torch.uint8)
    seeds = sample_seeds(7, 3, torch.arange(100, 100 + B))
    bv = BatchViews(16)
    a1, a2 = bv(x, seeds)
    b1, b2 = bv(x, seeds)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    # 1 process x batch 2b == 2 processes x batch b (each half on its own)
    h1 = [bv(x[s], seeds[s]) for s in (slice(0, 6), slice(6, 12))]
    torch.testing.assert_close(torch.cat([h[0] for h in h1]), a1, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([h[1] for h in h1]), a2, atol=1e-5, rtol=0)
    # any subset, in any order, with other samples around it
    perm = torch.randperm(B)[:5]
    c1, c2 = bv(x[perm], seeds[perm])
    torch.testing.assert_close(c1, a1[perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(c2, a2[perm], atol=1e-5, rtol=0)
    # the drawn parameters are bit-identical however the batch is split
    d_all, d_sub = bv.draw(seeds, 24, 24), bv.draw(seeds[perm], 24, 24)
    for v in range(2):
        for field in dataclasses.fields(ViewDraw):
            assert torch.equal(getattr(d_all[v], field.name)[perm], getattr(d_sub[v], field.name))
    # other seeds, other views; the two views of a sample differ
    o1, _ = bv(x, seeds + 1)
    assert not torch.allclose(o1, a1)
    assert not torch.allclose(a1, a2)


def test_outputs_follow_the_draws():
    """On constructed images, each op shows in the output exactly for the samples whose draw says so."""
    B, size = 64, 8
    seeds = torch.arange(B)
    # flip: a left-dark right-bright image, uncropped (scale 1, ratio 1)
    p = AugmentationParams(flip_p=0.5, color_jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0,
                           crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    ramp = torch.linspace(0, 1, size).expand(B, 3, size, size).contiguous()
    bv = BatchViews(size, (p, p))
    y, _ = bv(ramp, seeds)
    flipped = _unnorm(y)[:, 0, 0, 0] > _unnorm(y)[:, 0, 0, -1]
    assert torch.equal(flipped, bv.draw(seeds, size, size)[0].flip) and 10 < flipped.sum() < 54
    # grayscale and solarise: a constant orange image, luma 0.63; solarise inverts R (0.9) or the gray (0.63)
    q = AugmentationParams(flip_p=0, color_jitter_p=0, grayscale_p=0.3, blur_p=0, solarize_p=0.4)
    orange = torch.tensor([0.9, 0.6, 0.1]).view(1, 3, 1, 1).expand(B, 3, size, size).contiguous()
    bv = BatchViews(size, (q, q))
    _, y = bv(orange, seeds)
    d = bv.draw(seeds, size, size)[1]
    y = _unnorm(y)
    assert torch.equal(y[:, 0].std((1, 2)) < 1e-5, torch.ones(B, dtype=torch.bool))
    gray = (y[:, 0, 0, 0] - y[:, 1, 0, 0]).abs() < 1e-5
    solar = y[:, 0, 0, 0] < 0.5
    assert torch.equal(gray, d.gray) and torch.equal(solar, d.solarize)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randint(0, 256, (32, 3, 40, 40), dtype=torch.uint8)
    seeds = sample_seeds(0, 1, torch.arange(32))
    bv = BatchViews(32)
    c1, c2 = bv(x, seeds)
    g1, g2 = bv.to("cuda")(x.cuda(), seeds)
    assert g1.device.type == "cuda"
    torch.testing.assert_close(g1.cpu(), c1, atol=1e-3, rtol=0)
    torch.testing.assert_close(g2.cpu(), c2, atol=1e-3, rtol=0)


# -------------------------------------------------------------------------- same distributions as per-image

def _record(obj, name, sink, what=lambda args, result: result):
    fn = getattr(obj, name)

    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        sink.append(what(args, result))
        return result

    setattr(obj, name, wrapped)


def _instrument(compose: v2.Compose) -> dict:
    """Record what each random op of a per-image byol_view pipeline draws and does; ``ops`` keeps the
    pipeline's own random transforms (to draw more of their parameters directly)."""
    rec = {k: [] for k in ("crop", "flip", "jitter", "gray", "blur", "solarize")}
    ops = {}
    for t in compose.transforms:
        if isinstance(t, v2.RandomResizedCrop):
            ops["crop"] = t
            _record(t, "make_params", rec["crop"])
        elif isinstance(t, v2.RandomHorizontalFlip):
            _record(t, "transform", rec["flip"], lambda a, r: 1)
        elif isinstance(t, v2.RandomGrayscale):
            _record(t, "transform", rec["gray"], lambda a, r: 1)
        elif isinstance(t, v2.RandomSolarize):
            _record(t, "transform", rec["solarize"], lambda a, r: 1)
        elif isinstance(t, v2.RandomApply):
            inner = t.transforms[0]
            key = "jitter" if isinstance(inner, v2.ColorJitter) else "blur"
            ops[key] = inner
            _record(inner, "make_params", rec[key])
    return rec, ops


def _binom_ok(k: int, n: int, p: float) -> bool:
    if p in (0.0, 1.0):
        return k == round(n * p)
    return stats.binomtest(k, n, p).pvalue > P_FLOOR


def _same_rate(k1: int, n1: int, k2: int, n2: int) -> bool:
    if k1 * n2 == k2 * n1:
        return True
    return stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue > P_FLOOR


@pytest.fixture(scope="module")
def per_image_run():
    """The per-image pipelines of the default data.augment, instrumented: 300 tiny images run through them
    (how often each op fires), and 2000 more parameter draws from their own crop, jitter and blur transforms;
    the batched draws for 20000 samples."""
    torch.manual_seed(0)
    n_run, n_params, n_ours, size = 300, 2000, 20000, 8
    cfg = AugmentConfig()
    t1, t2 = byol_transforms(size, views=view_params(cfg))
    (rec1, ops1), (rec2, ops2) = _instrument(t1), _instrument(t2)
    imgs = torch.randint(0, 256, (n_run, 3, size, size), dtype=torch.uint8)
    for i in range(n_run):
        t1(imgs[i]), t2(imgs[i])
    recs = tuple({k: list(v) for k, v in rec.items()} for rec in (rec1, rec2))  # before the direct draws
    dummy = [imgs[0]]
    params = [{k: [op.make_params(dummy) for _ in range(n_params)] for k, op in ops.items()} for ops in (ops1, ops2)]
    bv = BatchViews.from_config(cfg, size)
    ours = bv.draw(sample_seeds(0, 0, torch.arange(n_ours)), size, size)
    return dict(n_run=n_run, n_ours=n_ours, cfg=cfg, recs=recs, params=params, ours=ours)


@pytest.mark.parametrize("view", [0, 1])
def test_same_op_frequencies_as_per_image_and_table_11(per_image_run, view):
    r = per_image_run
    cfg, rec, d, n, m = r["cfg"], r["recs"][view], r["ours"][view], r["n_run"], r["n_ours"]
    expected = {"flip": cfg.flip_p, "jitter": cfg.jitter_p, "gray": cfg.grayscale_p, "blur": cfg.blur_p[view],
                "solarize": cfg.solarize_p[view]}
    assert expected["blur"] == (1.0, 0.1)[view] and expected["solarize"] == (0.0, 0.2)[view]  # Table 11
    for op, p in expected.items():
        ours, theirs = int(getattr(d, op).sum()), len(rec[op])
        assert _binom_ok(ours, m, p), (op, ours, m, p)
        assert abs(ours / m - p) < 0.015, (op, ours / m, p)
        assert _binom_ok(theirs, n, p), (op, theirs, n, p)
        assert _same_rate(ours, m, theirs, n), (op, ours, theirs)


def test_same_jitter_factor_order_and_sigma_distributions(per_image_run):
    r = per_image_run
    cfg, d, theirs_jitter = r["cfg"], r["ours"][0], r["params"][0]["jitter"]
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    b, c, s, h = cfg.jitter
    ranges = [(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]
    ours = d.factors[d.jitter].numpy()
    for k, (name, (lo, hi)) in enumerate(zip(names, ranges)):
        theirs = np.array([p[name] for p in theirs_jitter])
        assert stats.ks_2samp(ours[:, k], theirs).pvalue > P_FLOOR, name
        assert stats.kstest(ours[:, k], "uniform", args=(lo, hi - lo)).pvalue > P_FLOOR, name
        assert lo <= ours[:, k].min() and ours[:, k].max() <= hi
    # the order: uniform over the 24 permutations, on both paths
    for orders in (d.order[d.jitter].tolist(), [p["fn_idx"].tolist() for p in theirs_jitter]):
        counts = Counter(tuple(o) for o in orders)
        assert len(counts) == 24 and stats.chisquare(list(counts.values())).pvalue > P_FLOOR
    # blur sigma ~ U[0.1, 2], both views
    lo, hi = cfg.blur_sigma
    for view in (0, 1):
        d = r["ours"][view]
        ours = d.sigma[d.blur].numpy()
        theirs = np.array([p["sigma"][0] for p in r["params"][view]["blur"]])
        assert stats.ks_2samp(ours, theirs).pvalue > P_FLOOR
        assert stats.kstest(ours, "uniform", args=(lo, hi - lo)).pvalue > P_FLOOR


def test_same_crop_distribution_tiny_images(per_image_run):
    """The (height, width) of the crop boxes on 8x8 images: the same discrete distribution; and the
    boxes the per-image pipeline actually used come from it too."""
    r = per_image_run
    for view in (0, 1):
        ours = Counter(map(tuple, r["ours"][view].box[:, 2:].tolist()))
        for sample in (r["params"][view]["crop"], r["recs"][view]["crop"]):
            theirs = Counter((p["height"], p["width"]) for p in sample)
            cells = sorted(c for c in set(ours) | set(theirs) if theirs[c] >= 10)
            rest = [sum(v for c, v in cnt.items() if c not in cells) for cnt in (ours, theirs)]
            table = np.array([[ours[c] for c in cells] + [rest[0]], [theirs[c] for c in cells] + [rest[1]]])
            assert stats.chi2_contingency(table).pvalue > P_FLOOR


def test_same_crop_distribution_at_224():
    """Area fraction, log aspect ratio and position of the crops of a 224 x 224 image, against torchvision's
    RandomResizedCrop sampler (KS tests), and against Table 11's scale and ratio ranges."""
    torch.manual_seed(0)
    n, H, W = 3000, 224, 224
    p = BYOL_T
    tv = v2.RandomResizedCrop(224, scale=p.crop_scale, ratio=p.crop_ratio)
    dummy = [torch.zeros(3, H, W, dtype=torch.uint8)]
    theirs = np.array([[r["top"], r["left"], r["height"], r["width"]] for r in
                       (tv.make_params(dummy) for _ in range(n))], dtype=float)
    ours = BA.draw_view(p, sample_seeds(0, 0, torch.arange(n)), 0, H, W).box.numpy().astype(float)

    def features(b):
        area = b[:, 2] * b[:, 3] / (H * W)
        log_ratio = np.log(b[:, 3] / b[:, 2])
        top = b[:, 0] / np.maximum(H - b[:, 2], 1)
        return area, log_ratio, top

    for name, a, t in zip(("area", "log_ratio", "top"), features(ours), features(theirs)):
        assert stats.ks_2samp(a, t).pvalue > P_FLOOR, name
    area, log_ratio, top = features(ours)
    assert 0.08 - 0.002 <= area.min() and area.max() <= 1.0
    assert abs(log_ratio).max() <= math.log(4 / 3) + 0.02
    assert abs(np.mean(top) - 0.5) < 0.03
