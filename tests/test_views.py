"""The training views of non-square images: both ``data.augment.on`` paths cut each view's crop from the full
image as torchvision's RandomResizedCrop does, from one per-sample seed; the workers' blur is torchvision's blur;
``synco views`` writes what the model sees. Everything runs on the CPU (``device=cpu``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2

from synco.config import AugmentConfig, load_config
from synco.data.batch_augment import BatchViews, crop_boxes, draw_view, sample_seeds
from synco.data.crops import PerImageViews, ViewCrops
from synco.data.folder import UnreadableImage, decode_rgb, open_image
from synco.data.transforms import BICUBIC, AugmentationParams, GaussianBlur, gaussian_blur, view_params
from synco.engine.data import PretrainData, prefetch_factor
from synco.io import load_torch_file

P_FLOOR = 1e-3  # a distribution test fails only below this p-value (several run per file)
VIEWS = view_params(AugmentConfig())


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A real photo (scikit-learn's china.jpg) resized to ``width`` x ``height`` (non-square)."""
    from sklearn.datasets import load_sample_images

    img = Image.fromarray(load_sample_images().images[seed % 2])
    return img.resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """``root/train/{a,b}/*.jpg``: 500 x 375 and 375 x 500 JPEGs (quality 90), the ImageNet shape of things."""
    root = tmp_path_factory.mktemp("jpegs")
    for k in range(8):
        out = root / "train" / "ab"[k % 2]
        out.mkdir(parents=True, exist_ok=True)
        _photo(*((500, 375) if k % 4 else (375, 500)), seed=k).save(out / f"{k}.jpg", quality=90)
    return root


# --------------------------------------------------------------------------------- crops of the full image


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375)])
def test_crop_boxes_follow_torchvision_on_the_full_image(height, width):
    """The crop of each view is drawn on the full non-square image as torchvision draws it: the distributions of
    the box's relative area, aspect ratio and position match ``v2.RandomResizedCrop.make_params`` (KS tests), and
    every box lies inside the full image (none confined to a centre square)."""
    n = 4000
    torch.manual_seed(0)
    ref_op = v2.RandomResizedCrop(224, scale=VIEWS[0].crop_scale, ratio=VIEWS[0].crop_ratio)
    dummy = [torch.zeros(3, height, width, dtype=torch.uint8)]
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                        for p in (ref_op.make_params(dummy) for _ in range(n))])
    ours = ViewCrops(224, VIEWS).boxes(sample_seeds(7, 0, torch.arange(n)), height, width)
    for v in (0, 1):
        b = ours[:, v]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 0] + b[:, 2] <= height).all() and (b[:, 1] + b[:, 3] <= width).all()
        for name, f in {"area": lambda x: x[:, 2] * x[:, 3] / (height * width),
                        "aspect": lambda x: x[:, 3] / x[:, 2],
                        "centre_y": lambda x: (x[:, 0] + x[:, 2] / 2) / height,
                        "centre_x": lambda x: (x[:, 1] + x[:, 3] / 2) / width}.items():
            p = stats.ks_2samp(f(b.double()).numpy(), f(ref.double()).numpy()).pvalue
            assert p > P_FLOOR, (name, v, p)
    # the old square path never showed the outer 12.5 % of the long side: here crops reach the borders
    long_axis = 1 if width > height else 0
    assert (ours[:, :, long_axis] == 0).any()


def test_crop_boxes_are_the_device_draws():
    """One stream per sample: the boxes the workers draw for a batch (with per-image sizes) are the ones
    ``draw_view`` draws for each view, so both paths key every parameter of a view by the same seed."""
    seeds = sample_seeds(3, 2, torch.arange(300))
    heights, widths = torch.randint(1, 700, (300,)), torch.randint(1, 700, (300,))
    boxes = crop_boxes(VIEWS, seeds, heights, widths)
    for k in range(0, 300, 23):
        for v in (0, 1):
            drawn = draw_view(VIEWS[v], seeds[k:k + 1], v, int(heights[k]), int(widths[k])).box[0]
            assert torch.equal(boxes[k, v], drawn)


def test_view_crops_are_torchvision_resized_crops_of_the_full_image():
    img = _photo(500, 375)
    crops = ViewCrops(64, VIEWS)(img, 12345)
    full = v2.functional.pil_to_tensor(img)
    boxes = ViewCrops(64, VIEWS).boxes(torch.tensor([12345]), 375, 500)[0]
    assert crops.shape == (2, 3, 64, 64) and crops.dtype == torch.uint8
    for v in (0, 1):
        ref = v2.functional.resized_crop(full, *boxes[v].tolist(), [64, 64], interpolation=BICUBIC, antialias=True)
        assert torch.equal(crops[v], ref)


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path):
    """A 2000 x 1500 JPEG whose crops all shrink by 2x or more is decoded with PIL's draft (1/2 .. 1/8 scale): the
    crops show the same region, within JPEG's own DCT-scaling error of the full decode."""
    path = tmp_path / "big.jpg"
    _photo(2000, 1500).save(path, quality=90)
    views = ViewCrops(64, (AugmentationParams(crop_scale=(0.5, 1.0)),) * 2)
    decoded = []
    real_decode = decode_rgb

    def spy(image):
        out = real_decode(image)
        decoded.append(out.size)
        return out

    import synco.data.crops as crops_module

    crops_module.decode_rgb = spy
    try:
        drafted = views(open_image(path), 99)
    finally:
        crops_module.decode_rgb = real_decode
    assert decoded and decoded[0][0] <= 1000  # decoded at half size or less, not 2000 px wide
    reference = views(v2.functional.pil_to_tensor(decode_rgb(open_image(path))), 99)
    diff = (drafted.float() - reference.float()).abs()
    assert diff.mean() < 3 and drafted.shape == reference.shape  # seen 1.1-2.2 over 20 seeds (DCT scaling itself)


def test_images_of_any_size_batch_on_both_paths(tmp_path):
    """Tiny, non-square and odd-sized images among others: every item is [2, 3, S, S] uint8 (the old square
    resize left small squares alone and could not stack them)."""
    for k, size in enumerate([(40, 30), (1, 1), (16, 16), (300, 17), (17, 300), (64, 48)]):
        out = tmp_path / "train" / "abc"[k % 3]
        out.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10 * k, 80, 200)).save(out / f"{k}.png")
    for on in ("workers", "device"):
        cfg = load_config("cpu-demo", [f"data.root={tmp_path}", f"data.augment.on={on}", "data.image_size=16",
                                       "data.num_workers=0", "device=cpu"])
        data = PretrainData(cfg.data, batch_size=6, seed=0)
        (pairs, index), labels = next(iter(data.loader(0)))
        assert pairs.shape == (6, 2, 3, 16, 16) and pairs.dtype == torch.uint8
        x1, x2 = data.views((pairs, index), 0, torch.device("cpu"))
        assert x1.shape == x2.shape == (6, 3, 16, 16) and torch.isfinite(x1).all()


def test_pixels_that_fail_to_decode_are_skipped_as_bad_images(jpeg_folder, tmp_path):
    """With lazy decoding a truncated JPEG passes the header read and fails in the crop transform: it is recorded
    in the bad-image log and the next image is used, on both paths and in batched fetches."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(jpeg_folder, root)
    victim = sorted((root / "train" / "a").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    with pytest.raises(UnreadableImage):
        decode_rgb(open_image(victim))
    for on in ("workers", "device"):
        log = tmp_path / f"bad-{on}.txt"
        cfg = load_config("cpu-demo", [f"data.root={root}", f"data.augment.on={on}", "data.image_size=16",
                                       "data.num_workers=0", "device=cpu"])
        pdata = PretrainData(cfg.data, batch_size=8, seed=0, bad_image_log=log)
        items = pdata.dataset.__getitems__([(0, i) for i in range(8)])
        assert len(items) == 8 and all(item[0][0].shape == (2, 3, 16, 16) for item in items)
        assert log.read_text().split() == [str(victim)]


# ------------------------------------------------------------------------------- one seed, both paths


def test_both_paths_make_the_same_views_when_only_the_crop_is_random(jpeg_folder):
    """With every op but the crop switched off, the workers' views and the device's views of a batch of non-square
    JPEGs are the same tensors: one crop per view, drawn from one seed per sample, cut from the full image."""
    crop_only = ["data.augment.flip_p=0", "data.augment.jitter_p=0", "data.augment.grayscale_p=0",
                 "data.augment.blur_p=[0,0]", "data.augment.solarize_p=[0,0]"]
    out = {}
    for on in ("workers", "device"):
        cfg = load_config("cpu-demo", [f"data.root={jpeg_folder}", f"data.augment.on={on}", "data.image_size=16",
                                       "data.num_workers=0", "device=cpu", *crop_only])
        data = PretrainData(cfg.data, batch_size=8, seed=5)
        batch, _ = next(iter(data.loader(1)))
        out[on] = data.views(batch, 1, torch.device("cpu"))
    for a, b in zip(out["workers"], out["device"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_workers_and_device_views_differ_beyond_the_crop(jpeg_folder):
    outs = []
    for on in ("workers", "device"):
        cfg = load_config("cpu-demo", [f"data.root={jpeg_folder}", f"data.augment.on={on}", "data.image_size=16",
                                       "data.num_workers=0", "device=cpu"])
        data = PretrainData(cfg.data, batch_size=8, seed=5)
        batch, _ = next(iter(data.loader(1)))
        outs.append(data.views(batch, 1, torch.device("cpu"))[0])
    assert not torch.equal(*outs)  # flips and colours come from the workers' torch generator vs the device hash


def test_device_views_of_worker_crops_flip_as_drawn():
    """BatchViews on the workers' crops ([B, 2, 3, S, S]) only flips what the crop step would have flipped."""
    p = AugmentationParams(flip_p=0.5, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    bv = BatchViews(16, (p, p), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    crops = torch.randint(0, 256, (64, 2, 3, 16, 16), dtype=torch.uint8)
    seeds = sample_seeds(1, 0, torch.arange(64))
    x1, x2 = bv(crops, seeds)
    draws = bv.draw(seeds, 16, 16)
    for v, x in enumerate((x1, x2)):
        expected = crops[:, v].float() / 255
        expected = torch.where(draws[v].flip[:, None, None, None], expected.flip(-1), expected)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert 10 < int(draws[0].flip.sum()) < 54


def test_seeds_do_not_collide_at_imagenet_scale():
    """The per-image seed both paths share: image i of epoch e + 1 and image i + 1,000,033 of epoch e drew the
    same stream under the old linear key; the hash gives 2 x 1.3M distinct seeds."""
    n = 1_300_000
    seeds = torch.cat([sample_seeds(0, e, torch.arange(n)) for e in (0, 1)])
    assert torch.unique(seeds).numel() == 2 * n
    old = lambda e, i: (0 * 1_000_003 + e * 1_000_033 + i) % 2**63  # noqa: E731 - the old key, for the record
    assert old(1, 5) == old(0, 5 + 1_000_033)


def test_per_image_views_leave_the_callers_random_state_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    PerImageViews(32, VIEWS)(_photo(60, 45), 42)
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------------ the fast blur


@pytest.mark.parametrize("size, sigma", [(224, 0.1), (224, 0.7), (224, 2.0), (37, 1.3), (16, 0.5)])
def test_blur_is_torchvisions_blur(size, sigma):
    """Two banded matrix products give torchvision's dense-kernel blur: uint8 within one level (a different float
    summation order can round the other way at .5), almost everywhere equal; float to float rounding."""
    from synco.data.transforms import blur_kernel_size

    g = torch.Generator().manual_seed(size)
    x = torch.randint(0, 256, (3, size, size + 5), dtype=torch.uint8, generator=g)
    k = blur_kernel_size(size)
    ours, ref = gaussian_blur(x, k, [sigma, sigma]), v2.functional.gaussian_blur(x, [k, k], [sigma, sigma])
    diff = (ours.int() - ref.int()).abs()
    assert ours.dtype == torch.uint8 and diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    xf = x.float() / 255
    torch.testing.assert_close(gaussian_blur(xf, k, [sigma, sigma]),
                               v2.functional.gaussian_blur(xf, [k, k], [sigma, sigma]), rtol=0, atol=1e-5)


def test_blur_transform_draws_sigma_as_torchvision():
    ours, ref = GaussianBlur(23, sigma=(0.1, 2.0)), v2.GaussianBlur(23, sigma=(0.1, 2.0))
    torch.manual_seed(0)
    a = [ours.make_params([]) for _ in range(5)]
    torch.manual_seed(0)
    b = [ref.make_params([]) for _ in range(5)]
    assert a == b
    img = _photo(50, 40)
    out = ours(img)
    assert isinstance(out, Image.Image) and out.size == img.size


# ------------------------------------------------------------------------------------ shared memory


def test_prefetch_fits_the_shared_memory(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, 64 * 2**20))  # Docker's default /dev/shm
    assert prefetch_factor(0, 10**9, tmp_path) is None
    assert prefetch_factor(2, 2**20, tmp_path) == 2
    assert prefetch_factor(8, 3 * 2**20, tmp_path) == 1
    from synco.errors import SyncoError

    with pytest.raises(SyncoError, match="shm-size"):
        prefetch_factor(8, 38 * 2**20, tmp_path)  # a DeiT-S batch of 128 x 2 uint8 views: 38 MB


# ----------------------------------------------------------------------------------------- synco views


@pytest.mark.parametrize("on", ["workers", "device"])
def test_synco_views_saves_what_the_model_sees(jpeg_folder, tmp_path, on):
    out = tmp_path / on
    done = subprocess.run([sys.executable, "-m", "synco", "views", "--config", "cpu-demo", "--out", str(out), "--n", "3",
                           "--save", f"data.root={jpeg_folder}", f"data.augment.on={on}", "data.image_size=16",
                           "data.num_workers=0", "device=cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = load_torch_file(out / "views.pt")
    assert set(saved) == {"view1", "view2", "index"}
    assert saved["view1"].shape == saved["view2"].shape == (3, 3, 16, 16) and saved["view1"].dtype == torch.uint8
    assert saved["index"].tolist() == [0, 4, 7]
    png = np.asarray(Image.open(out / "views.png"))
    assert png.ndim == 3 and png.shape[0] > 100
    # the saved views are the training views: the same as the loader's, normalisation undone
    cfg = load_config("cpu-demo", [f"data.root={jpeg_folder}", f"data.augment.on={on}", "data.image_size=16",
                                   "data.num_workers=0", "device=cpu"])
    from synco.viz.views import make_views

    again = make_views(PretrainData(cfg.data, batch_size=3, seed=cfg.seed), [0, 4, 7], 0, torch.device("cpu"))
    assert torch.equal(again[0], saved["view1"]) and torch.equal(again[1], saved["view2"])


def test_synco_views_bad_inputs_are_one_paragraph(tmp_path, capsys):
    from synco.cli.main import main

    (tmp_path / "file").write_text("x")
    cases = [(["--n", "0"], "--n"), (["--epoch", "-1"], "--epoch"), (["epochs=abc"], "epochs"),
             (["--config", "nope"], "unknown preset"), (["--out", str(tmp_path / "file")], "existing file"),
             (["--device", "cuda:0", "--n", "1"], "device=cuda:0")]
    for args, says in cases:
        out = ["--out", str(tmp_path / "v")] if "--out" not in args else []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
            code = main(["views", *out, *args])
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err, (args, err)
