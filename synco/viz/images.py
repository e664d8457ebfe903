"""Images to look at: the built-in sample photos (offline) or a user's file/folder, plus optional masks.

Every image goes through the evaluation geometry at the model's input size: shorter side resized to
``size``, centre crop ``size x size`` (``eval_transform(size, crop_ratio=1.0)``), then ImageNet
normalisation. Masks follow the same geometry (nearest neighbour), so they line up with the maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..data.transforms import eval_transform
from ..errors import SyncoError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# (name, loader): real photographs that ship inside scikit-image and scikit-learn (no download).
DEFAULT_IMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")


@dataclass
class NamedImage:
    name: str
    image: np.ndarray  # uint8 [H, W, 3]


def _sklearn_sample(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(f"{name}.jpg")


def default_images() -> list[NamedImage]:
    """The built-in sample photos: scikit-image's astronaut, chelsea (cat), coffee, rocket and
    scikit-learn's china (temple) and flower."""
    import skimage.data

    out = []
    for name in DEFAULT_IMAGE_NAMES:
        img = _sklearn_sample(name) if name in ("china", "flower") else getattr(skimage.data, name)()
        out.append(NamedImage(name, _rgb(np.asarray(img))))
    return out


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(a * (255 if a.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _read(path: Path, mode: str = "RGB") -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError) as e:
        raise SyncoError(f"cannot read image '{path}': {e}") from None


def image_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise SyncoError(f"folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        return files
    raise SyncoError(f"--images '{path}' is neither an image file nor a folder.")


def load_images(path: Optional[str | Path] = None, max_images: Optional[int] = None) -> list[NamedImage]:
    """Images from a file or a folder (sorted by name); the built-in photos when ``path`` is None."""
    images = default_images() if path is None else [NamedImage(f.stem, _read(f)) for f in image_files(path)]
    return images[:max_images] if max_images else images


def load_masks(path: str | Path, images: list[NamedImage]) -> list[np.ndarray]:
    """Boolean foreground masks [H, W] (pixel > 127 in grayscale), one per image, at each image's size.

    ``path`` is one mask image used for every image, or a folder holding ``<image name>.<ext>`` per image."""
    p = Path(path)
    if p.is_file():
        files = [p] * len(images)
    elif p.is_dir():
        by_stem = {f.stem: f for f in image_files(p)}
        missing = [im.name for im in images if im.name not in by_stem]
        if missing:
            raise SyncoError(f"mask folder '{path}' has no mask for {', '.join(missing[:5])} "
                             "(masks are matched to images by file name without extension).")
        files = [by_stem[im.name] for im in images]
    else:
        raise SyncoError(f"--mask '{path}' is neither an image file nor a folder.")
    masks = []
    for f, im in zip(files, images):
        m = _read(f, "L") > 127
        if m.shape != im.image.shape[:2]:
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
                (im.image.shape[1], im.image.shape[0]), Image.NEAREST)) > 127
        masks.append(m)
    return masks


def to_model_input(images: list[NamedImage], size: int) -> torch.Tensor:
    """Normalised batch [B, 3, size, size]: shorter side to ``size``, centre crop (eval geometry)."""
    t = eval_transform(size, crop_ratio=1.0)
    return torch.stack([t(Image.fromarray(im.image)) for im in images])


def denormalize(x: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> np.ndarray:
    """Normalised [B, 3, H, W] back to displayable float [B, H, W, 3] in [0, 1]."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x.detach().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def masks_to_model_geometry(masks: list[np.ndarray], size: int) -> torch.Tensor:
    """Boolean [B, size, size]: the masks through the images' resize + centre crop (nearest)."""
    out = []
    for m in masks:
        t = torch.from_numpy(np.asarray(m, dtype=np.uint8))[None]
        t = TF.resize(t, size, interpolation=v2.InterpolationMode.NEAREST)
        t = TF.center_crop(t, [size, size])
        out.append(t[0].bool())
    return torch.stack(out)
