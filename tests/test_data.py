"""Data layer: digits, safe image folders, transforms and create_dataset."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from synco.data.build import create_dataset
from synco.data.digits import DigitsDataset, export_digits_imagefolder
from synco.data.folder import SafeImageFolder, count_bad_images, load_class_list
from synco.data.transforms import (
    BYOL_T,
    BYOL_T_PRIME,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    TwoViews,
    blur_kernel_size,
    byol_transforms,
    eval_transform,
    train_classification_transform,
)
from synco.errors import SyncoError


@pytest.fixture(scope="module")
def digits_train():
    return DigitsDataset("train")


@pytest.fixture(scope="module")
def digits_test():
    return DigitsDataset("test")


def _photo(h=60, w=80) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- digits

def test_digits_split_sizes_disjoint_and_stratified(digits_train, digits_test):
    assert (len(digits_train), len(digits_test)) == (1437, 360)
    assert digits_train.samples_count == 1437 and digits_test.samples_count == 360
    assert set(digits_train.indices).isdisjoint(digits_test.indices)
    assert sorted([*digits_train.indices, *digits_test.indices]) == list(range(1797))
    full = Counter(load_digits().target.tolist())
    test_counts = Counter(digits_test.targets)
    for c in range(10):
        assert abs(test_counts[c] - 0.2 * full[c]) <= 1, "each class keeps its 20% share in the test split"
        assert Counter(digits_train.targets)[c] + test_counts[c] == full[c]
    assert digits_train.classes == [str(d) for d in range(10)]


def test_digits_split_is_deterministic(digits_test):
    again = DigitsDataset("test")
    assert again.targets == digits_test.targets
    np.testing.assert_array_equal(again.images, digits_test.images)


def test_digits_images_are_rgb_renderings_of_the_real_digits(digits_train):
    img, label = digits_train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert isinstance(label, int) and label == digits_train.targets[0]
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert digits_train.images.dtype == np.uint8 and digits_train.images.shape == (1437, 32, 32, 3)
    # At native size the rendering is exactly the 0..16 -> 0..255 rescale of sklearn's pixels.
    native = DigitsDataset("train", image_size=8)
    raw = load_digits().images[native.indices]
    np.testing.assert_array_equal(native.images[..., 0], np.rint(raw * 255 / 16).astype(np.uint8))
    assert native.images.max() == 255 and native.images.min() == 0


def test_digits_transform_and_bad_split():
    ds = DigitsDataset("test", transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]),
                       image_size=16)
    x, _ = ds[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    with pytest.raises(SyncoError, match="train, test"):
        DigitsDataset("validation")


def test_export_digits_round_trip(tmp_path, digits_test):
    root = export_digits_imagefolder(tmp_path / "d", "test", image_size=32)
    folder = ImageFolder(root)
    assert folder.classes == digits_test.classes
    assert len(folder) == 360 and Counter(folder.targets) == Counter(digits_test.targets)
    # Files are named by dataset index: each one carries its original label and pixels.
    index = [int(Path(p).stem) for p, _ in folder.samples]
    assert sorted(index) == list(range(360))
    assert folder.targets == [digits_test.targets[i] for i in index]
    img, _ = folder[7]
    np.testing.assert_array_equal(np.asarray(img), digits_test.images[index[7]])  # PNG is lossless


def test_digits_folder_fixture(digits_folder):
    train, val = ImageFolder(digits_folder / "train"), ImageFolder(digits_folder / "val")
    assert (len(train), len(val)) == (200, 100)
    assert Counter(train.targets) == {c: 20 for c in range(10)}
    assert train[0][0].size == (32, 32)


# ---------------------------------------------------------------- SafeImageFolder

def test_safe_image_folder_reads_tiny_folder(tiny_imagefolder):
    ds = SafeImageFolder(tiny_imagefolder / "train")
    assert ds.classes == ["indoor", "outdoor", "space"]
    assert len(ds) == 18 and Counter(ds.targets) == {0: 6, 1: 6, 2: 6}
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (48, 48) and label == 0


def test_class_list_restricts_and_sorts(tiny_imagefolder):
    ds = SafeImageFolder(tiny_imagefolder / "val", class_list=["space", "indoor"])
    assert ds.classes == ["indoor", "space"]  # sorted(class_list), not list order
    assert ds.class_to_idx == {"indoor": 0, "space": 1}
    assert len(ds) == 6 and set(ds.targets) == {0, 1}
    assert all("outdoor" not in path for path, _ in ds.samples)
    assert all(f"/{ds.classes[t]}/" in path for path, t in ds.samples)


def test_folder_errors(tmp_path, tiny_imagefolder):
    with pytest.raises(SyncoError, match="does not exist"):
        SafeImageFolder(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SyncoError, match="not a directory"):
        SafeImageFolder(tmp_path / "file.txt")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(SyncoError, match="no class sub-folders"):
        SafeImageFolder(tmp_path / "empty_root")
    with pytest.raises(SyncoError, match=r"2 of the 3 requested classes are missing.*n000001, n000002"):
        SafeImageFolder(tiny_imagefolder / "train", class_list=["space", "n000002", "n000001"])

    root = tmp_path / "with_empty"
    shutil.copytree(tiny_imagefolder / "train", root)
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(SyncoError, match="zebra.*contain no images"):
        SafeImageFolder(root)


@pytest.fixture
def folder_with_corrupt(tmp_path, tiny_imagefolder):
    root = tmp_path / "corrupt"
    shutil.copytree(tiny_imagefolder / "train", root)
    bad = root / "outdoor" / "03.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg" + bytes(range(256)))
    return root, bad


def test_corrupt_image_is_skipped_logged_and_counted(folder_with_corrupt, tmp_path, caplog):
    root, bad = folder_with_corrupt
    log = tmp_path / "logs" / "bad_images.txt"
    assert count_bad_images(log) == 0 and count_bad_images(None) == 0
    ds = SafeImageFolder(root, transform=v2.Compose([v2.ToImage()]), bad_image_log=log)
    i = [p for p, _ in ds.samples].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="synco.data"):
        x, label = ds[i]
    nxt, nxt_label = ds[i + 1]
    assert torch.equal(x, nxt) and label == nxt_label
    assert str(bad) in caplog.text
    assert log.read_text().splitlines() == [str(bad)]
    ds[i]  # seen again (next epoch): logged again, counted once
    assert len(log.read_text().splitlines()) == 2 and count_bad_images(log) == 1
    # Every sample still loads, so a DataLoader pass over the folder survives.
    loader = torch.utils.data.DataLoader(ds, batch_size=6, collate_fn=lambda b: b)
    assert sum(len(b) for b in loader) == 18


def test_corrupt_last_image_wraps_and_all_corrupt_raises(tmp_path, tiny_imagefolder):
    root = tmp_path / "wrap"
    shutil.copytree(tiny_imagefolder / "val", root)
    ds = SafeImageFolder(root)
    Path(ds.samples[-1][0]).write_bytes(b"garbage")
    assert ds[len(ds) - 1][1] == ds[0][1]
    for path, _ in ds.samples:
        Path(path).write_bytes(b"garbage")
    with pytest.raises(SyncoError, match="could not be read"):
        ds[0]


def test_load_class_list(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# my subset\nn01\n\n  n02  # trailing comment\nn01\n")
    assert load_class_list(f) == ["n01", "n02"]
    shipped = load_class_list("imagenet100")
    assert len(shipped) == 100 and len(set(shipped)) == 100
    assert all(c.startswith("n") and len(c) == 9 for c in shipped)
    with pytest.raises(SyncoError, match="does not exist"):
        load_class_list(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(SyncoError, match="no class names"):
        load_class_list(tmp_path / "blank.txt")


# ---------------------------------------------------------------- create_dataset

def test_build_digits():
    train = create_dataset("digits", root="/ignored", split="train", image_size=16)
    val = create_dataset("digits", split="val")
    assert isinstance(train, DigitsDataset) and len(train) == 1437 and train[0][0].size == (16, 16)
    assert len(val) == 360 and val.classes == train.classes and len(val.targets) == 360
    with pytest.raises(SyncoError, match="class_list"):
        create_dataset("digits", class_list=["0"])


def test_build_folder_layouts(tiny_imagefolder, tmp_path):
    train = create_dataset("folder", tiny_imagefolder, "train")
    val = create_dataset("folder", tiny_imagefolder, "val", class_list=["space"])
    assert (len(train), len(train.targets), train.classes) == (18, 18, ["indoor", "outdoor", "space"])
    assert (len(val), val.classes) == (3, ["space"])
    assert len(create_dataset("folder", tiny_imagefolder, "test")) == 9  # test is an alias for val
    flat = create_dataset("folder", tiny_imagefolder / "train", "train")  # class folders directly
    assert len(flat) == 18
    with pytest.raises(SyncoError, match="no val/ folder.*root/train/<class>"):
        create_dataset("folder", tiny_imagefolder / "train", "val")
    with pytest.raises(SyncoError, match=f"{tmp_path / 'missing'}.*root/train/<class>"):
        create_dataset("folder", tmp_path / "missing")
    with pytest.raises(SyncoError, match="needs a root"):
        create_dataset("folder")
    with pytest.raises(SyncoError, match="Unknown dataset 'cifar'.*digits, imagenet100, folder"):
        create_dataset("cifar", tiny_imagefolder)


def test_build_imagenet100_uses_shipped_list(tmp_path):
    wnids = load_class_list("imagenet100")
    pixel = Image.new("RGB", (8, 8), (10, 20, 30))
    for split in ("train", "val"):
        for c in [*wnids, "n99999999"]:  # one class outside the list must be ignored
            (tmp_path / split / c).mkdir(parents=True)
            pixel.save(tmp_path / split / c / "a.png")
    ds = create_dataset("imagenet100", tmp_path, "val", bad_image_log=tmp_path / "bad.txt")
    assert ds.classes == sorted(wnids) and len(ds) == 100 and ds.targets == list(range(100))
    shutil.rmtree(tmp_path / "train" / wnids[0])
    with pytest.raises(SyncoError, match=f"1 of the 100 requested classes are missing.*{wnids[0]}"):
        create_dataset("imagenet100", tmp_path, "train")


# ---------------------------------------------------------------- transforms

def _ops(compose, kind):
    """Transforms of type ``kind`` in ``compose``, each with the probability it is applied."""
    found = []
    for t in compose.transforms:
        if isinstance(t, v2.RandomApply):
            found += [(inner, t.p) for inner in t.transforms if isinstance(inner, kind)]
        elif isinstance(t, kind):
            found.append((t, getattr(t, "p", 1.0)))
    return found


def test_table11_parameters():
    for params in (BYOL_T, BYOL_T_PRIME):
        assert (params.crop_p, params.flip_p, params.color_jitter_p, params.grayscale_p) == (1.0, 0.5, 0.8, 0.2)
        assert (params.brightness, params.contrast, params.saturation, params.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (BYOL_T.blur_p, BYOL_T.solarize_p) == (1.0, 0.0)
    assert (BYOL_T_PRIME.blur_p, BYOL_T_PRIME.solarize_p) == (0.1, 0.2)


@pytest.mark.parametrize("view, blur_p", [(0, 1.0), (1, 0.1)])
def test_byol_pipeline_matches_table11(view, blur_p):
    t = byol_transforms(224)[view]
    (crop, crop_p), = _ops(t, v2.RandomResizedCrop)
    assert crop_p == 1.0 and crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == v2.InterpolationMode.BICUBIC
    (_, flip_p), = _ops(t, v2.RandomHorizontalFlip)
    assert flip_p == 0.5
    (jitter, jitter_p), = _ops(t, v2.ColorJitter)
    assert jitter_p == 0.8
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == pytest.approx((-0.1, 0.1))
    (_, gray_p), = _ops(t, v2.RandomGrayscale)
    assert gray_p == 0.2
    (blur, p), = _ops(t, v2.GaussianBlur)
    assert p == blur_p and list(blur.kernel_size) == [23, 23] and list(blur.sigma) == [0.1, 2.0]
    solarize = _ops(t, v2.RandomSolarize)
    if view == 0:
        assert solarize == []
    else:
        (sol, p), = solarize
        assert p == 0.2 and sol.threshold == 128  # uint8 stage: BYOL's threshold 0.5
    normalize = _ops(t, v2.Normalize)[0][0]
    assert normalize.mean == list(IMAGENET_DEFAULT_MEAN) and normalize.std == list(IMAGENET_DEFAULT_STD)
    # Order matters: photometric ops run on uint8 before the float conversion and normalisation.
    kinds = [type(x).__name__ for x in t.transforms]
    assert kinds.index("ToDtype") > kinds.index("RandomGrayscale") and kinds[-2:] == ["Normalize", "ToPureTensor"]


def test_blur_kernel_is_odd_and_about_ten_percent():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3 and blur_kernel_size(8) == 3
    for size in range(20, 400, 7):
        k = blur_kernel_size(size)
        assert k % 2 == 1 and k >= 3 and abs(k - 0.1 * size) <= 1
    t, _ = byol_transforms(32)
    assert list(_ops(t, v2.GaussianBlur)[0][0].kernel_size) == [3, 3]


def test_byol_views_shapes_and_difference():
    t, t_prime = byol_transforms(32)
    img = _photo()
    for x in (t(img), t_prime(img), t(v2.functional.pil_to_tensor(img))):
        assert type(x) is torch.Tensor and x.shape == (3, 32, 32) and x.dtype == torch.float32
    a, b = TwoViews(t, t_prime)(img)
    assert not torch.allclose(a, b)
    torch.manual_seed(5)
    first = t(img)
    torch.manual_seed(5)
    assert torch.equal(first, t(img)), "augmentations are reproducible under a fixed torch seed"


def test_two_views_in_a_dataloader():
    calls = []
    views = TwoViews(lambda im: calls.append(1) or "a", lambda im: "b")
    assert views(object()) == ("a", "b") and calls == [1]
    ds = DigitsDataset("test", transform=TwoViews(*byol_transforms(16)), image_size=16)
    (v1, v2_), labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert v1.shape == v2_.shape == (4, 3, 16, 16) and labels.tolist() == ds.targets[:4]


def test_eval_transform_resize_crop_and_normalise():
    t = eval_transform(224)
    resize = next(x for x in t.transforms if isinstance(x, v2.Resize))
    assert resize.size == [256] and resize.interpolation == v2.InterpolationMode.BICUBIC
    assert t(_photo(300, 451)).shape == (3, 224, 224)
    assert eval_transform(32)(_photo()).shape == (3, 32, 32)
    # A flat image at the ImageNet mean colour normalises to ~0.
    mean_rgb = tuple(round(m * 255) for m in IMAGENET_DEFAULT_MEAN)
    x = eval_transform(32)(Image.new("RGB", (40, 50), mean_rgb))
    assert x.abs().max() < 0.02


def test_train_classification_transform():
    t = train_classification_transform(48, crop_scale=(0.5, 1.0))
    x = t(_photo())
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert not _ops(t, v2.ColorJitter), "linear probing uses crop + flip only"
    assert _ops(t, v2.RandomResizedCrop)[0][0].scale == (0.5, 1.0)


# ---------------------------------------------------------------- pretraining batches


@pytest.mark.parametrize("max_images", [None, 300])
def test_in_memory_batches_equal_the_per_item_path(max_images):
    """On the device path the digits are fetched a whole batch at a time: the same images, indices and labels, in
    the sampler's order, as looking each item up in the dataset."""
    from synco.config import load_config
    from synco.engine.data import PretrainData, resolve_index

    cfg = load_config("cpu-demo", [f"data.max_images={max_images or 'null'}", "device=cpu"])
    fast = PretrainData(cfg.data, batch_size=32, seed=4)
    assert fast.batched is not None
    n = 0
    for epoch in (0, 3):
        fast.sampler.set_epoch(epoch)
        keys = list(iter(fast.sampler))
        for b, ((images, index), labels) in enumerate(fast.loader(epoch)):
            assert images.dtype == torch.uint8 and images.shape == (32, 3, 16, 16)
            assert index.tolist() == [i for _, i in keys[32 * b: 32 * b + 32]]
            for k in (0, 31):
                base, j = resolve_index(fast.real, int(index[k]))
                image, label = base.sample(j)
                assert torch.equal(images[k], v2.functional.pil_to_tensor(image)) and labels[k] == label
            n += 1
    assert n == 2 * ((max_images or 1437) // 32)
    workers = load_config("cpu-demo", ["data.augment.on=workers", "data.num_workers=0", "device=cpu"])
    assert PretrainData(workers.data, batch_size=32, seed=4).batched is None  # per-image views in workers


def test_view_stream_takes_the_first_n_batches_of_each_epoch_after_a_skip():
    """The trainer reads one stream over the remaining epochs: each epoch must start at its own first batch, even
    when the epoch has batches left over (short of a gradient-accumulation step) and after a resume's skip."""
    import itertools

    from synco.config import load_config
    from synco.engine.data import PretrainData

    cfg = load_config("cpu-demo", ["data.max_images=224"])  # 7 batches of 32 per epoch; the stream uses 6
    data = PretrainData(cfg.data, batch_size=32, seed=1)
    cpu = torch.device("cpu")
    got = list(data.view_stream(0, 2, 3, 6, cpu))
    expected = [(*data.views(b, e, cpu), labels) for e in range(3)
                for b, labels in itertools.islice(data.loader(e, skip_batches=2 if e == 0 else 0), 6 - (2 if e == 0 else 0))]
    assert len(got) == len(expected) == 4 + 6 + 6
    for (a1, a2, la), (b1, b2, lb) in zip(got, expected):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(la, lb)
