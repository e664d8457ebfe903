"""Shared fixtures: tiny offline image datasets and per-test seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _photos() -> dict[str, list[np.ndarray]]:
    """Real photos that ship with scikit-image / scikit-learn, two per class (no download)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {
        "indoor": [skimage.data.chelsea(), skimage.data.coffee()],
        "outdoor": [china, flower],
        "space": [skimage.data.astronaut(), skimage.data.rocket()],
    }


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """``root/{train,val}/{indoor,outdoor,space}/*.jpg``: 6 train and 3 val 48x48 RGB crops per class."""
    root = tmp_path_factory.mktemp("tiny_imagefolder")
    rng = np.random.default_rng(0)
    for cls, photos in _photos().items():
        # Shrink first so a 48 px crop shows a recognisable part of the photo, not a flat patch.
        small = []
        for p in photos:
            img = Image.fromarray(p)
            scale = 96 / min(img.size)
            small.append(np.asarray(img.resize((round(img.width * scale), round(img.height * scale)))))
        for split, n in (("train", 6), ("val", 3)):
            out = root / split / cls
            out.mkdir(parents=True)
            for i in range(n):
                p = small[i % len(small)]
                y = rng.integers(0, p.shape[0] - 48 + 1)
                x = rng.integers(0, p.shape[1] - 48 + 1)
                Image.fromarray(p[y:y + 48, x:x + 48]).save(out / f"{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """``root/{train,val}/<0..9>/*.png``: 32x32 digits, 20 train and 10 val (from the test split) per class."""
    from synco.data.digits import export_digits_imagefolder

    root = tmp_path_factory.mktemp("digits_folder")
    export_digits_imagefolder(root / "train", "train", image_size=32, per_class=20)
    export_digits_imagefolder(root / "val", "test", image_size=32, per_class=10)
    return root


# A pretraining config small enough for seconds-long CPU runs (digits subset, 1-block ViT).
TINY_OVERRIDES = [
    "epochs=2", "optim.warmup_epochs=0", "negatives.warmup_epochs=0", "negatives.cooldown_epochs=0",
    "optim.batch_size=32", "contrast.queue_size=128", "negatives.n_hard=16", "negatives.counts=[4,4,4,4,4,4]",
    "model.proj_hidden=64", "model.pred_hidden=64", "model.proj_dim=32",
    "model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "data.max_images=128", "knn_at_end=false", "log_every=1", "threads=1",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY_OVERRIDES)


@pytest.fixture
def one_thread():
    """One torch thread for tests that time or compare runs on this shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
