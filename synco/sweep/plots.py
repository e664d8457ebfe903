"""PNG plots of a sweep (matplotlib's object API on the Agg canvas: headless, no global pyplot state).

* one dimension, numeric values (a single key): a line of means with a 95 % CI band, log x when the
  values span a decade or more (queue sizes);
* one categorical dimension, three or more, or none: bars of means with 95 % CI error bars;
* two dimensions: a heat map with annotated cells (mean ± std), as Figure 3 of the SynBY paper, and a
  grouped plot (x = first dimension, one series per level of the second);
* paired differences: the mean difference with its 95 % CI per comparison, against a zero line.

The seeds' individual values are drawn as small dots. Every file is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..viz.curves import new_figure, save_png
from .axes import Dimension


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _yerr(stats: Sequence) -> np.ndarray:
    """Asymmetric error bars to the CI; zero length where the CI is undefined (n < 2)."""
    lo = [s.mean - s.ci_low if _finite(s.ci_low) else 0.0 for s in stats]
    hi = [s.ci_high - s.mean if _finite(s.ci_high) else 0.0 for s in stats]
    return np.array([lo, hi])


def _seed_dots(ax, xs, rows, color="k"):
    for x, r in zip(xs, rows):
        vals = list(r["seeds"].values())
        if vals:
            ax.scatter([x] * len(vals), vals, s=9, color=color, alpha=0.45, zorder=3, linewidths=0)


def _tight_ylim(ax, rows):
    vals = [v for r in rows for v in r["seeds"].values()]
    vals += [x for r in rows for x in (r["stats"].ci_low, r["stats"].ci_high) if _finite(x)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
    ax.set_ylim(lo - pad, hi + pad)


def bars(ax, labels: list[str], rows: list[dict], ylabel: str, color: str = "C0") -> None:
    xs = np.arange(len(rows))
    st = [r["stats"] for r in rows]
    means = [s.mean if _finite(s.mean) else 0.0 for s in st]
    ax.bar(xs, means, yerr=_yerr(st), capsize=4, color=color, alpha=0.75, edgecolor="k", linewidth=0.5)
    _seed_dots(ax, xs, rows)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30 if max(len(x) for x in labels) > 8 else 0, ha="right"
                       if max(len(x) for x in labels) > 8 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    _tight_ylim(ax, rows)
    ax.grid(axis="y", alpha=0.3)


def _numeric_x(dim: Dimension) -> tuple[list[float], bool]:
    xs = [float(r[0]) for r in dim.rows]
    log = all(x > 0 for x in xs) and max(xs) / min(xs) >= 10
    return xs, log


def line(ax, xs: list[float], rows: list[dict], label: Optional[str] = None, color: str = "C0",
         log: bool = False) -> None:
    order = np.argsort(xs)
    xs = [xs[i] for i in order]
    rows = [rows[i] for i in order]
    st = [r["stats"] for r in rows]
    mean = np.array([s.mean for s in st], dtype=float)
    ax.plot(xs, mean, "o-", color=color, label=label, zorder=4)
    lo = np.array([s.ci_low if _finite(s.ci_low) else np.nan for s in st], dtype=float)
    hi = np.array([s.ci_high if _finite(s.ci_high) else np.nan for s in st], dtype=float)
    if np.isfinite(lo).any():
        ax.fill_between(xs, lo, hi, color=color, alpha=0.18, linewidth=0)
    _seed_dots(ax, xs, rows, color=color)
    if log:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=8)
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def heatmap(fig, ax, d0: Dimension, d1: Dimension, rows: list[dict], label: str) -> None:
    mean = np.full((len(d0.rows), len(d1.rows)), np.nan)
    text = [["n/a"] * len(d1.rows) for _ in d0.rows]
    for r in rows:
        i, j = r["index"]
        s = r["stats"]
        if s.n:
            mean[i, j] = s.mean
            text[i][j] = f"{s.mean:.1f}\n± {s.std:.1f}" if s.n > 1 else f"{s.mean:.1f}\n(n=1)"
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, aspect="auto", origin="lower")
    finite = mean[np.isfinite(mean)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            dark = np.isfinite(mean[i, j]) and mean[i, j] < mid
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8, color="w" if dark else "k")
    ax.set_xticks(range(len(d1.rows)))
    ax.set_xticklabels(d1.labels, fontsize=8)
    ax.set_yticks(range(len(d0.rows)))
    ax.set_yticklabels(d0.labels, fontsize=8)
    ax.set_xlabel(d1.name)
    ax.set_ylabel(d0.name)
    fig.colorbar(im, ax=ax, label=label)


def paired_plot(ax, paired: list[dict], label: str) -> None:
    names = [f"{p['a']} − {p['b']}" + (f" ({', '.join(map(str, p['context'].values()))})" if p["context"] else "")
             for p in paired]
    ys = np.arange(len(paired))[::-1]
    st = [p["stats"] for p in paired]
    ax.errorbar([s.mean for s in st], ys, xerr=_yerr(st), fmt="o", capsize=4, color="C3")
    for y, p in zip(ys, paired):
        s = p["stats"]
        ax.annotate(f"n={s.n}", (s.mean, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel(f"paired difference in {label} (95 % CI)")
    ax.grid(axis="x", alpha=0.3)


def sweep_plots(spec, rows: list[dict], paired: list[dict], metrics: list[str], out: Path,
                labels: dict[str, str]) -> list[Path]:
    """Per metric: its figure (a line, grouped series or bars, by the sweep's dimensions; a heat map too for two
    dimensions) and the paired differences when the spec compares levels."""
    files = []
    for m in metrics:
        mrows = [r for r in rows if r["metric"] == m]
        if not mrows:
            continue
        ylabel = labels.get(m, m)
        if len(spec.dims) == 2:
            files.append(save_png(_heatmap_figure(spec, mrows, ylabel), out / f"sweep_{m}_heatmap.png"))
        fig, ax = _metric_figure(spec.dims, mrows, ylabel)
        ax.set_title(f"{spec.name}: {ylabel}, mean and 95 % CI over seeds", fontsize=9)
        files.append(save_png(fig, out / f"sweep_{m}.png"))
        prow = [p for p in paired if p["metric"] == m and p["stats"].n]
        if prow:
            fig = new_figure(6, 0.45 * len(prow) + 1.6)
            paired_plot(fig.add_subplot(), prow, ylabel)
            fig.axes[0].set_title(f"{spec.name}: paired differences over common seeds", fontsize=9)
            files.append(save_png(fig, out / f"sweep_paired_{m}.png"))
    return files


def _metric_figure(dims: list[Dimension], mrows: list[dict], ylabel: str):
    """(figure, axes) of one metric: a line over one numeric dimension, series over two, else bars."""
    if len(dims) == 1 and dims[0].numeric:
        fig = new_figure(6, 4)
        ax = fig.add_subplot()
        xs, log = _numeric_x(dims[0])
        line(ax, [xs[r["index"][0]] for r in mrows], mrows, log=log)
        ax.set_xlabel(dims[0].name)
        ax.set_ylabel(ylabel)
        _tight_ylim(ax, mrows)
    elif len(dims) == 2:
        d0, d1 = dims
        fig = new_figure(max(6, 0.8 * len(d0.rows) * len(d1.rows) + 2), 4)
        ax = fig.add_subplot()
        (_grouped_lines if d0.numeric else _grouped_bars)(ax, d0, d1, mrows)
        ax.set_xlabel(d0.name)
        ax.set_ylabel(ylabel)
        _tight_ylim(ax, mrows)
        ax.legend(fontsize=7)
    else:
        fig = new_figure(max(5, 0.7 * len(mrows) + 2), 4)
        ax = fig.add_subplot()
        names = [", ".join(r["levels"].values()) or r["point"] for r in mrows]
        bars(ax, names, mrows, ylabel)
        if len(dims) == 1:
            ax.set_xlabel(dims[0].name)
    return fig, ax


def _heatmap_figure(spec, mrows: list[dict], ylabel: str):
    d0, d1 = spec.dims
    fig = new_figure(1.3 * len(d1.rows) + 2.6, 0.9 * len(d0.rows) + 1.8)
    ax = fig.add_subplot()
    heatmap(fig, ax, d0, d1, mrows, ylabel)
    ax.set_title(f"{spec.name}: {ylabel}", fontsize=9)
    return fig


def _series(mrows: list[dict], j: int) -> list[dict]:
    """The rows at level ``j`` of the second dimension, in the first dimension's order."""
    return sorted((r for r in mrows if r["index"][1] == j), key=lambda r: r["index"][0])


def _grouped_lines(ax, d0: Dimension, d1: Dimension, mrows: list[dict]) -> None:
    xs, log = _numeric_x(d0)
    for j, lab in enumerate(d1.labels):
        sub = _series(mrows, j)
        line(ax, [xs[r["index"][0]] for r in sub], sub, label=f"{d1.name}={lab}", color=f"C{j % 10}", log=log)


def _grouped_bars(ax, d0: Dimension, d1: Dimension, mrows: list[dict]) -> None:
    width = 0.8 / len(d1.rows)
    for j, lab in enumerate(d1.labels):
        sub = _series(mrows, j)
        xs = np.array([r["index"][0] for r in sub]) + (j - (len(d1.rows) - 1) / 2) * width
        st = [r["stats"] for r in sub]
        ax.bar(xs, [s.mean if _finite(s.mean) else 0 for s in st], width=width, yerr=_yerr(st), capsize=3,
               color=f"C{j % 10}", alpha=0.75, edgecolor="k", linewidth=0.5, label=f"{d1.name}={lab}")
        _seed_dots(ax, xs, sub)
    ax.set_xticks(range(len(d0.rows)))
    ax.set_xticklabels(d0.labels, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
