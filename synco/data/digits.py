"""scikit-learn's 8x8 handwritten digits as a small, offline RGB image dataset.

1,797 real digits ship with scikit-learn, so tests, smoke runs and CPU-only
experiments never need a download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from synco.errors import SyncoError

SPLITS = ("train", "test")


def split_indices(y: np.ndarray, split: str) -> np.ndarray:
    """Sorted positions of ``split`` ("train": 1437, "test": 360) among the labels ``y`` of ``load_digits()``."""
    # Fixed seed + stratification: every run and every machine sees the same 1437/360 split.
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    return np.sort(train_idx if split == "train" else test_idx)


def _render(raw: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 8, 8) values 0..16 -> (N, S, S, 3) uint8 RGB."""
    gray = np.clip(np.rint(raw * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    out = np.empty((len(gray), image_size, image_size, 3), dtype=np.uint8)
    for i, g in enumerate(gray):
        big = Image.fromarray(g).resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(big)[..., None]
    return out


class DigitsDataset(torch.utils.data.Dataset):
    """The scikit-learn digits as RGB PIL images of ``image_size`` x ``image_size``.

    ``split`` is "train" (1437 images) or "test" (360), a fixed stratified split.
    Items are ``(transform(img) or img, label)``; ``images`` holds all of them as one
    (N, S, S, 3) uint8 array.
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train", transform=None, image_size: int = 32):
        if split not in SPLITS:
            raise SyncoError(f"Unknown digits split {split!r}: the digits dataset has only the splits "
                             f"{', '.join(SPLITS)}. Pass one of them.")
        if int(image_size) < 1:
            raise SyncoError(f"Digits image_size must be a positive number of pixels, got {image_size}.")
        bunch = load_digits()
        idx = split_indices(bunch.target, split)
        self.split = split
        self.indices = idx  # positions in sklearn's load_digits(), for provenance
        self.transform = transform
        self.image_size = int(image_size)
        self.images = _render(bunch.images[idx], self.image_size)
        self.targets = [int(t) for t in bunch.target[idx]]
        self.samples_count = len(self.targets)

    def __len__(self) -> int:
        return self.samples_count

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image as ``[N, 3, S, S]`` uint8 and every label as ``[N]`` int64 (the images are rendered at their
        final size), for whole-batch lookups."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous(), torch.tensor(self.targets)

    def __getitem__(self, index: int):
        return self.sample(index, self.transform)

    def sample(self, index: int, transform=None):
        """``(transform(image), target)`` of sample ``index`` (the image as PIL RGB)."""
        img = Image.fromarray(self.images[index])
        return (transform(img) if transform is not None else img), self.targets[index]


def export_digits_imagefolder(root, split: str = "train", image_size: int = 32,
                              per_class: int | None = None) -> Path:
    """Write ``root/<class>/<idx>.png`` so the split can be read back as an ImageFolder.

    ``per_class`` keeps only the first N images of each class (small fixtures).
    Returns ``root`` as a Path.
    """
    ds = DigitsDataset(split, image_size=image_size)
    root = Path(root)
    kept = dict.fromkeys(range(len(ds.classes)), 0)
    for i, label in enumerate(ds.targets):
        if per_class is not None and kept[label] >= per_class:
            continue
        kept[label] += 1
        class_dir = root / ds.classes[label]
        class_dir.mkdir(parents=True, exist_ok=True)
        # Zero-padded so ImageFolder's sorted file order equals the dataset order.
        Image.fromarray(ds.images[i]).save(class_dir / f"{i:04d}.png")
    return root
