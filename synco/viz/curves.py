"""Training curves of one or more pretraining runs from their ``metrics.jsonl``: loss, k-NN top-1 and the
cosines of the positive and of the hardest negative against epoch, one line per run.

Records are read as the engine writes them (``synco.engine.metrics``): per-step records carry ``step``,
``epoch`` and ``loss`` (and ``pos_cos`` / ``hardest_neg_cos``); one ``epoch_end`` record per epoch
carries the step at which the epoch ended; monitor records carry ``knn_top1``. The x axis is the
fractional epoch: a step is placed by linear interpolation between the epoch ends (extrapolated with
the last epoch's length past the last one, e.g. in a run still going); a record logged at an epoch end
(such as the k-NN monitor) lands on a whole epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..engine.metrics import read_jsonl
from ..errors import SyncoError

# (panel title, y label, [(record key, line style)])
PANELS = {
    "loss": ("loss", "training loss", [("loss", "-")]),
    "knn": ("k-NN top-1", "k-NN top-1 (%)", [("knn_top1", "o-")]),
    "cosine": ("cosines", "cosine (solid: positive, dashed: hardest negative)",
               [("pos_cos", "-"), ("hardest_neg_cos", "--")]),
}
DEFAULT_PANELS = ("loss", "knn", "cosine")


@dataclass
class RunCurves:
    label: str
    path: Path
    series: dict = field(default_factory=dict)  # key -> (x epochs, y) arrays


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (object API: headless, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path) -> Path:
    """Render through a temp file in the same folder, then rename: readers never see half a PNG."""
    from ..io import atomic_write_bytes_with  # torch comes with it: wait until a figure is written

    path = Path(path)
    fig.tight_layout()
    atomic_write_bytes_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def read_records(path: Path) -> list[dict]:
    """The JSON records of ``metrics.jsonl`` (a half-written last line from a killed run is skipped)."""
    try:
        Path(path).open().close()  # an unreadable log is an error here, not an empty curve
    except OSError as e:
        raise SyncoError(f"cannot read '{path}': {e.strerror or e}.") from None
    return read_jsonl(path)


def epoch_of_steps(records: list[dict]):
    """A function step -> fractional epoch, from the ``epoch_end`` records (or the per-record epochs)."""
    ends = {}
    for r in records:
        if r.get("epoch_end") and isinstance(r.get("step"), (int, float)) and isinstance(r.get("epoch"), int):
            ends[r["epoch"]] = float(r["step"])
    if ends:
        epochs = sorted(ends)
        xs = [0.0] + [ends[e] for e in epochs]  # steps at which epochs 0..E ended
        ys = [float(epochs[0])] + [e + 1.0 for e in epochs]
        last_len = max(xs[-1] - xs[-2], 1e-9)

        def f(step: float, epoch: Optional[int] = None) -> float:
            if step > xs[-1]:
                return ys[-1] + (step - xs[-1]) / last_len
            return float(np.interp(step, xs, ys))

        return f
    # No epoch end yet (a run killed in its first epoch): place steps within their epoch by rank.
    spans: dict[int, list] = {}
    for r in records:
        if isinstance(r.get("step"), (int, float)) and isinstance(r.get("epoch"), int):
            spans.setdefault(r["epoch"], []).append(float(r["step"]))
    bounds = {e: (min(v), max(v)) for e, v in spans.items()}

    def g(step: float, epoch: Optional[int] = None) -> float:
        if epoch not in bounds:
            return step
        lo, hi = bounds[epoch]
        return epoch + (step - lo + 1) / (hi - lo + 1)

    return g


def run_curves(run_dir, label: Optional[str] = None) -> RunCurves:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.exists():
        raise SyncoError(f"'{run_dir}' has no metrics.jsonl; give run directories of `synco pretrain`.")
    records = read_records(path)
    to_epoch = epoch_of_steps(records)
    keys = {k for _, _, lines in PANELS.values() for k, _ in lines}
    data: dict[str, dict[float, float]] = {k: {} for k in keys}
    for r in records:
        if r.get("epoch_end") or not isinstance(r.get("step"), (int, float)):
            continue
        x = to_epoch(float(r["step"]), r.get("epoch"))
        for k in keys:
            v = r.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                data[k][x] = float(v)  # a duplicated step keeps its last value
    series = {k: (np.array(sorted(d)), np.array([d[x] for x in sorted(d)])) for k, d in data.items() if d}
    return RunCurves(label or (run_dir.name if run_dir.is_dir() else run_dir.parent.name), path, series)


def _labels(dirs: Sequence[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (``seed0`` vs ``method-moby/seed0``)."""
    parts = [Path(d).resolve().parts for d in dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in dirs]


def plot_curves(run_dirs: Sequence, out, panels: Sequence[str] = DEFAULT_PANELS, title: Optional[str] = None,
                labels: Optional[Sequence[str]] = None) -> Path:
    """Write a PNG with one panel per metric that any run has (loss, k-NN, cosines), one line per run."""
    if not run_dirs:
        raise SyncoError("give at least one run directory.")
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        raise SyncoError(f"unknown curve panel '{unknown[0]}' (valid: {', '.join(PANELS)}).")
    labels = list(labels) if labels else _labels([Path(d) for d in run_dirs])
    runs = [run_curves(d, lab) for d, lab in zip(run_dirs, labels)]
    shown = [p for p in panels if any(k in r.series for r in runs for k, _ in PANELS[p][2])]
    if not shown:
        raise SyncoError(f"no loss, k-NN or cosine records in {', '.join(str(r.path) for r in runs)}.")
    fig = new_figure(5.0 * len(shown), 3.8)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, p in zip(axes, shown):
        name, ylabel, lines = PANELS[p]
        for i, r in enumerate(runs):
            for j, (key, style) in enumerate(lines):
                if key not in r.series:
                    continue
                x, y = r.series[key]
                ax.plot(x, y, style, color=f"C{i % 10}", lw=1.3, ms=3,
                        label=r.label if j == 0 or lines[0][0] not in r.series else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if len(runs) > 1 or p == "cosine":
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    out = png_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, out)


def png_path(out) -> Path:
    """Where ``--out`` puts the figure: a .png path as given, else ``curves.png`` in that folder."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        out = out / "curves.png" if out.is_dir() or not out.suffix else out.with_suffix(".png")
    return out
