"""PNG grids in the papers' layout: one row per image, the input first, then one column per checkpoint.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state), so it works
headless and from threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

HEAT = "heat"  # map over the image as a semi-transparent heat map
MASK = "mask"  # boolean map: outside darkened, boundary outlined (DINO's thresholded attention)
MAP = "map"  # the map alone, no image


@dataclass
class Column:
    label: str
    maps: Optional[np.ndarray]  # [rows, H, W] in [0, 1] (bool for MASK); None = not available
    notes: Optional[Sequence[str]] = None  # one short caption per row (e.g. the map's entropy)
    note: str = "n/a"  # shown in place of a missing map


def _as_numpy(a) -> Optional[np.ndarray]:
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def grid_figure(path: str | Path, images: np.ndarray, columns: Sequence[Column], row_labels: Sequence[str],
                kind: str = HEAT, title: Optional[str] = None, alpha: float = 0.5, cmap: str = "jet",
                cell_inches: float = 1.9, dpi: int = 100, show_input: bool = True) -> Path:
    """Write a PNG grid. ``images``: float [rows, H, W, 3] in [0, 1]. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = np.asarray(images)
    rows = len(images)
    cols = [Column("input", None)] * show_input + list(columns)
    fig = Figure(figsize=(cell_inches * len(cols), cell_inches * rows + (0.45 if title else 0.2)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(cols), squeeze=False)
    for r in range(rows):
        img = images[r]
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0:
                ax.set_title(col.label, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
            if show_input and c == 0:
                ax.imshow(img)
                continue
            maps = _as_numpy(col.maps)
            if maps is None:
                ax.imshow(img * 0.25)
                ax.text(0.5, 0.5, col.note, color="white", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes)
                continue
            m = maps[r]
            if col.notes is not None and col.notes[r]:
                ax.set_xlabel(col.notes[r], fontsize=7, labelpad=2)
            if kind == MASK:
                keep = m.astype(bool)
                ax.imshow(img * (0.2 + 0.8 * keep[..., None]))
                if keep.any() and not keep.all():
                    ax.contour(keep.astype(float), levels=[0.5], colors="yellow", linewidths=1.0)
            elif kind == MAP:
                ax.imshow(m, cmap=cmap, vmin=0.0, vmax=1.0)
            else:
                ax.imshow(img)
                ax.imshow(m, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
