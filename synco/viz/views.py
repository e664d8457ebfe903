"""What a config's augmentations do to its training images: ``synco views``.

The images are the training set's own, and the views are made by the very code a run uses (its
``data.augment.on`` path, its seed, epoch 0 unless told otherwise), so what the grid shows is what the model sees:
each image, then its two views before normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import default_collate

from ..config import Config
from ..data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ..engine.data import PretrainData, pretrain_data_kwargs, resolve_index
from ..engine.dist import DistInfo
from ..errors import SyncoError
from ..io import atomic_save, atomic_write_bytes_with


def spread_indices(n_images: int, n: int) -> list[int]:
    """``n`` indices spread evenly over the dataset (class folders are contiguous: this shows several classes)."""
    if n < 1:
        raise SyncoError(f"--n must be >= 1, got {n}.")
    n = min(n, n_images)
    return sorted({int(round(i * (n_images - 1) / max(n - 1, 1))) for i in range(n)})


def make_views(data: PretrainData, index: list[int], epoch: int, device: torch.device):
    """``(view1, view2)`` uint8 ``[N, 3, S, S]`` of dataset items ``index``, as training makes them (normalisation
    undone)."""
    keys = [(epoch, i) for i in index]
    items = data.dataset.__getitems__(keys)
    batch = items[0] if data.batched is not None else default_collate(items)[0]
    x1, x2 = data.views(batch, epoch, device)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x1.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x1.device).view(1, 3, 1, 1)
    return tuple((x * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8).cpu() for x in (x1, x2))


def original_image(data: PretrainData, i: int) -> np.ndarray:
    """Training item ``i`` as it is on disk (decoded RGB, full size), uint8 ``[H, W, 3]``."""
    from ..data.folder import decode_rgb

    base, j = resolve_index(data.real if data.synthetic is None else data.dataset.dataset, i)
    image, _ = base.sample(j)
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0).numpy()
    return np.asarray(decode_rgb(image))


def write_grid(path: Path, originals: list[np.ndarray], views: tuple, index: list[int], title: str) -> Path:
    from .curves import new_figure

    rows = len(originals)
    fig = new_figure(3 * 2.0, rows * 2.0 + 0.4)
    axes = fig.subplots(rows, 3, squeeze=False)
    for r in range(rows):
        h, w = originals[r].shape[:2]
        cells = [(originals[r], f"#{index[r]}: {w}x{h}"), (views[0][r].permute(1, 2, 0).numpy(), "view 1 (T)"),
                 (views[1][r].permute(1, 2, 0).numpy(), "view 2 (T')")]
        for c, (img, label) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write_bytes_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def render_views(cfg: Config, out: Path, n: int = 8, save: bool = False, epoch: int = 0,
                 device: Optional[torch.device] = None) -> dict:
    """Write ``out/views.png`` (and with ``save``, ``out/views.pt``: ``{"view1", "view2": uint8 [N, 3, S, S],
    "index": [N]}``) for ``n`` training images of ``cfg``; returns what was written."""
    device = device or torch.device("cpu")
    data = PretrainData(**pretrain_data_kwargs(cfg, DistInfo()))
    index = spread_indices(len(data.dataset), n)
    view1, view2 = make_views(data, index, epoch, device)
    originals = [original_image(data, i) for i in index]
    title = (f"{cfg.data.dataset} {cfg.data.root or ''}: data.augment.on={cfg.data.augment.on}, seed {cfg.seed}, "
             f"epoch {epoch}, {cfg.data.image_size} px")
    written = {"png": str(write_grid(Path(out) / "views.png", originals, (view1, view2), index, title))}
    if save:
        atomic_save({"view1": view1, "view2": view2, "index": torch.tensor(index)}, Path(out) / "views.pt")
        written["pt"] = str(Path(out) / "views.pt")
    return {"images": len(index), "index": index, **written}
