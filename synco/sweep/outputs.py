"""A sweep's results: each finished run's numbers, aggregated per point (mean, std, Student-t CI over seeds) and
per compared pair of levels (paired differences over common seeds), written as ``sweep.csv``, ``sweep.md``,
``sweep.json``, ``sweep_paired.csv`` and PNG plots. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.metrics import read_jsonl, training_summary
from ..errors import SyncoError
from ..io import atomic_write_text
from . import stats
from .launch import LOCKED
from .planning import Run, finished
from .probe_cache import linear_top1_of
from .spec import SweepSpec

# Metrics read for every run (when present): summary.json keys, plus linear_top1 from sweep_eval.json.
DEFAULT_METRICS = ("knn_top1", "linear_top1", "final_loss", "pos_cos", "hardest_neg_cos")
PLOT_METRICS = ("knn_top1", "linear_top1")
METRIC_LABELS = {"knn_top1": "k-NN top-1 (%)", "linear_top1": "linear top-1 (%)", "final_loss": "final loss",
                 "pos_cos": "cosine of the positive", "hardest_neg_cos": "cosine of the hardest negative"}


@dataclass
class SweepResult:
    out: Path
    runs: list[Run]
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # (run, exit status, log)
    files: list[Path] = field(default_factory=list)
    markdown: str = ""
    table: list[dict] = field(default_factory=list)
    paired: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Metrics of one run


def run_metrics(run_dir: Path, names: list[str]) -> dict[str, float]:
    """Numbers of one finished run: ``summary.json`` keys, ``linear_top1`` from ``sweep_eval.json``, and
    final loss / cosines from the last training record of ``metrics.jsonl`` when the summary lacks them."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    summary.update(_cached_linear_top1(run_dir / "sweep_eval.json"))
    if any(name not in summary for name in names):  # summaries written before these keys existed
        summary = {**training_summary(read_jsonl(run_dir / "metrics.jsonl"), None), **summary}
    out = {}
    for name in names:
        v = summary.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[name] = float(v)
    return out


def _cached_linear_top1(path: Path) -> dict:
    """``{"linear_top1": x}`` from a run's ``sweep_eval.json`` (``{}`` when there is none). One that holds no
    percentage was damaged or edited: averaged in it would pass for a measured number, dropped it would leave the
    point with a seed fewer unseen, so it stops the sweep naming the file (``--linear`` probes it again)."""
    if not path.exists():  # not probed (no --linear yet, or its probe failed: listed as failed)
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # a torn write: refused below like a bad value, never a silent seed fewer
        data = {"linear_top1": "(not readable JSON)"}
    if not isinstance(data, dict) or "linear_top1" not in data:
        return {}
    top1 = linear_top1_of(data)
    if top1 is None:
        raise SyncoError(f"'{path}' holds linear_top1={data['linear_top1']!r}, not a top-1 in [0, 100]: the file was "
                         "damaged or edited by hand. Re-run the sweep with --linear (the probe is run again), or "
                         "delete the file.")
    return {"linear_top1": top1}


# ---------------------------------------------------------------------------------------------
# Aggregation


def aggregate(spec: SweepSpec, runs: list[Run], metrics: list[str]) -> tuple[list[dict], list[dict], list[str]]:
    """(rows: one per point x metric, paired rows, the metrics that have any value)."""
    by_point: dict[str, list[Run]] = {}
    for r in runs:
        by_point.setdefault(r.point.name, []).append(r)
    values: dict[tuple[str, str], dict[int, float]] = {}  # (point, metric) -> seed -> value
    for name, rs in by_point.items():
        for r in rs:
            for m, v in run_metrics(r.dir, metrics).items():
                values.setdefault((name, m), {})[r.seed] = v
    present = [m for m in metrics if any(k[1] == m for k in values)]
    points = {r.point.name: r.point for r in runs}
    rows = []
    for name, p in points.items():
        for m in present:
            vals = values.get((name, m), {})
            rows.append({"point": name, "levels": dict(p.levels), "index": p.index, "metric": m,
                         "stats": stats.describe(list(vals.values())), "seeds": dict(sorted(vals.items())),
                         "runs": len(by_point[name])})
    paired = _paired_rows(spec, list(points.values()), values, present) if spec.compare else []
    return rows, paired, present


def _paired_rows(spec: SweepSpec, points: list, values: dict, present: list[str]) -> list[dict]:
    """The compared pairs of levels, within each context (equal levels of the other dimensions)."""
    di = [d.name for d in spec.dims].index(spec.compare.axis)
    dim = spec.dims[di]
    by_index = {p.index: p for p in points}
    contexts = sorted({p.index[:di] + p.index[di + 1:] for p in points})
    paired = []
    for ctx in contexts:
        for a, b in spec.compare.pairs:
            pa = by_index.get(ctx[:di] + (a,) + ctx[di:])
            pb = by_index.get(ctx[:di] + (b,) + ctx[di:])
            if pa is None or pb is None:
                continue
            context = {k: v for k, v in pa.levels.items() if k != dim.name}
            for m in present:
                st = stats.paired_difference(values.get((pa.name, m), {}), values.get((pb.name, m), {}))
                paired.append({"axis": dim.name, "a": dim.labels[a], "b": dim.labels[b], "context": context,
                               "metric": m, "stats": st})
    return paired


# ---------------------------------------------------------------------------------------------
# Writing


def write_outputs(spec: SweepSpec, runs: list[Run], out: Path, failed: list, command: str = "") -> SweepResult:
    metrics = list(dict.fromkeys(list(DEFAULT_METRICS) + spec.metrics))
    rows, paired, present = aggregate(spec, runs, metrics)
    gaps = _missing_cells(runs, rows)
    if gaps:
        more = f" and {len(gaps) - 5} more" if len(gaps) > 5 else ""
        print(f"synco sweep: note: {len(gaps)} finished run(s) lack a number the other seeds of their point have, "
              f"so those cells average fewer seeds: {'; '.join(gaps[:5])}{more}. Re-run the run (delete its "
              "summary.json) to fill them.", file=sys.stderr)
    seeds = sorted({r.seed for r in runs})
    out.mkdir(parents=True, exist_ok=True)
    files = []
    md = markdown(spec, rows, paired, present, runs, failed, command)
    for name, text in (("sweep.csv", _csv(rows, spec, seeds)), ("sweep.md", md + "\n")):
        atomic_write_text(text, out / name)
        files.append(out / name)
    if spec.compare:
        atomic_write_text(_paired_csv(paired, spec), out / "sweep_paired.csv")
        files.append(out / "sweep_paired.csv")
    data = _sweep_json(spec, runs, rows, paired, present, seeds, failed, command)
    atomic_write_text(json.dumps(data, indent=2, default=str) + "\n", out / "sweep.json")
    files.append(out / "sweep.json")
    if rows:
        from .plots import sweep_plots

        files += sweep_plots(spec, rows, paired, [m for m in PLOT_METRICS if m in present] or present[:1], out,
                             {m: METRIC_LABELS.get(m, m) for m in present})
    return SweepResult(out, runs, failed, files, md, rows, paired)


def _missing_cells(runs: list[Run], rows: list[dict]) -> list[str]:
    """'RUN: no METRIC' for each finished run without a number that other seeds of its point have (a summary.json
    edited by hand, or written before the number existed)."""
    have = {(r["point"], r["metric"]): r["seeds"] for r in rows}
    return [f"{run.dir}: no {metric}" for run in runs if finished(run.dir)
            for (point, metric), seeds in have.items() if point == run.point.name and seeds and run.seed not in seeds]


def _sweep_json(spec: SweepSpec, runs: list[Run], rows: list[dict], paired: list[dict], present: list[str],
                seeds: list[int], failed: list, command: str) -> dict:
    return {
        "spec": spec.name, "origin": spec.origin, "base": spec.base, "command": command,
        "dims": [{"name": d.name, "keys": d.keys, "levels": d.labels, "values": [list(r) for r in d.rows]}
                 for d in spec.dims],
        "seeds": seeds, "metrics": present,
        "points": [{"name": r["point"], "levels": r["levels"], "metric": r["metric"], **r["stats"].to_dict(),
                    "seed_values": {str(k): v for k, v in r["seeds"].items()}} for r in rows],
        "paired": [{"axis": p["axis"], "a": p["a"], "b": p["b"], "context": p["context"], "metric": p["metric"],
                    **p["stats"].to_dict()} for p in paired],
        "runs": [{"point": r.point.name, "seed": r.seed, "dir": str(r.dir),
                  "finished": finished(r.dir)} for r in runs],
        "failed": [{"run": n, "exit": rc, "log": log} for n, rc, log in failed],
    }


def _csv(rows: list[dict], spec: SweepSpec, seeds: list[int]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    dims = [d.name for d in spec.dims]
    w.writerow(["point", *dims, "metric", "n", "mean", "std", "ci_low", "ci_high", *[f"seed{s}" for s in seeds]])

    def num(v):
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else repr(float(v))

    for r in rows:
        st = r["stats"]
        w.writerow([r["point"], *[r["levels"][d] for d in dims], r["metric"], st.n, num(st.mean), num(st.std),
                    num(st.ci_low), num(st.ci_high), *[num(r["seeds"].get(s)) for s in seeds]])
    return buf.getvalue()


def _paired_csv(paired: list[dict], spec: SweepSpec) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    others = [d.name for d in spec.dims if spec.compare and d.name != spec.compare.axis]
    w.writerow(["axis", "a", "b", *others, "metric", "n", "mean_diff", "std", "ci_low", "ci_high", "seeds"])
    for p in paired:
        st = p["stats"]
        w.writerow([p["axis"], p["a"], p["b"], *[p["context"][o] for o in others], p["metric"], st.n,
                    *["" if not math.isfinite(v) else repr(v) for v in (st.mean, st.std, st.ci_low, st.ci_high)],
                    " ".join(map(str, st.seeds))])
    return buf.getvalue()


def _md_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
    return "\n".join(out)


def markdown(spec: SweepSpec, rows: list[dict], paired: list[dict], present: list[str], runs: list[Run],
             failed: list, command: str) -> str:
    dims = [d.name for d in spec.dims]
    digits = {m: stats.guess_digits(v for r in rows if r["metric"] == m for v in r["seeds"].values())
              for m in present}
    text = [f"# Sweep `{spec.name}`", ""]
    if spec.description:
        text += [spec.description.strip(), ""]
    text += [f"Base `{spec.base}`; {len(runs)} runs; cells are mean ± std (ddof 1) [95 % CI, Student t] over "
             "seeds; n/a where fewer than 2 seeds finished.", ""]
    if command:
        text += [f"Command: `{command}`", ""]
    lines = _point_lines(rows, dims, present, digits)
    if lines:
        text += [_md_table([*(dims or ["point"]), "n", *present], lines), ""]
    else:
        text += ["No run has finished yet.", ""]
    if paired:
        others = [d for d in dims if d != spec.compare.axis]
        plines = [[f"{p['a']} − {p['b']}", *[p["context"][o] for o in others], p["metric"], str(p["stats"].n),
                   stats.fmt_stats(p["stats"], digits[p["metric"]], signed=True)] for p in paired]
        text += [f"## Paired differences over common seeds ({spec.compare.axis})", "",
                 _md_table(["difference", *others, "metric", "n", "mean ± std [95 % CI]"], plines), ""]
    if failed:
        text += ["## Failed runs", ""] + [
            f"- `{name}` ({'still being run by another process' if rc == LOCKED else f'exit {rc}'}): see `{log}`"
            for name, rc, log in failed] + [""]
    return "\n".join(text)


def _point_lines(rows: list[dict], dims: list[str], present: list[str], digits: dict) -> list[list[str]]:
    """One table line per point: its levels, how many seeds finished, and each metric's cell."""
    lines = []
    for name in dict.fromkeys(r["point"] for r in rows):
        prow = {r["metric"]: r for r in rows if r["point"] == name}
        any_row = next(iter(prow.values()))
        n_done = max(r["stats"].n for r in prow.values())
        ident = [any_row["levels"][d] for d in dims] if dims else [name]
        line = [*ident, f"{n_done}/{any_row['runs']}"]
        for m in present:
            st = prow[m]["stats"]
            cell = stats.fmt_stats(st, digits[m])
            if st.n != n_done and st.n:
                cell += f" (n={st.n})"
            line.append(cell)
        lines.append(line)
    return lines
