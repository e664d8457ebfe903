"""`synco report DIR...`: the JSON results of several runs in one table, laid out like the papers'
tables: one row per evaluated backbone (a pretraining run, or ``random``), one column per metric.

Every ``*.json`` under the given folders that carries a ``protocol`` key is read (files marked
``part_of`` another result, e.g. the per-dataset files of ``transfer``, are skipped). Columns come
from the result's ``report`` mapping (``{"column": number}``; any protocol can add one), or for
k-NN from its per-k top-1 (``k-NN k=20``, Table 12). A column measured on more than one dataset
gets the dataset in brackets. When two files give the same cell, the newer file wins.

Every cell is a percentage (top-1, top-5, mAP): a value that is not a finite number in [0, 100], and a ``*.json``
that cannot be read (a result cut short), stop the report naming the file, since a dropped or impossible number
would pass for a measured one or leave a hole that looks like a missing evaluation. ``eval efficiency`` results
(timings and memory, no backbone to put in a row) and results with no column are left out, with a note on stderr.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from ..errors import SyncoError
from ..io import atomic_write_text
from ..options import DuplicateKeyError, load_yaml
from .results import markdown_table, number_problem

PROTOCOL_ORDER = ("knn", "linear", "finetune", "transfer")
ID_COLUMNS = ["Method", "Backbone", "Run"]
# Results that are not rows of the method x metric table: eval efficiency measures the cost of pretraining a
# method (images/s, memory, hours), on no checkpoint, so it has no run to be a row of.
NOT_ROWS = {"efficiency": "`eval efficiency` timings are not a method x metric row; its own table is in that file"}


def find_results(dirs: list) -> list[tuple[Path, dict]]:
    found = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise SyncoError(f"'{d}' does not exist; give folders holding result JSON files (e.g. a run's eval/).")
        files = [d] if d.is_file() else sorted(p for p in d.rglob("*.json")
                                               if not any(part.startswith(".") for part in p.relative_to(d).parts))
        for f in files:
            data = _read_json(f)
            if isinstance(data, dict) and isinstance(data.get("protocol"), str) and not data.get("part_of"):
                found.append((f, data))
    return found


def _read_json(path: Path):
    """A JSON file's content. One that cannot be read is refused, never skipped: it may be a result cut short (a
    killed write, a full disk), and leaving it out would leave a hole in the table that looks like a missing
    evaluation."""
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:  # ValueError: not JSON, or not UTF-8 text
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{e.__class__.__name__}: {e}".split("\n")[0]
        raise SyncoError(f"'{path}' cannot be read as JSON ({why[:200]}); it may be a result cut short or damaged, "
                         "and leaving it out would leave a hole in the table. Re-run the evaluation that wrote it, "
                         "or move the file out of the folders reported.") from None


def _run_dir(checkpoint) -> Path:
    p = Path(checkpoint)
    return p.parent if p.suffix in (".pt", ".safetensors") else p


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte in it: not this run
        return False


def resolve_run(result: dict, path: Path) -> Optional[Path]:
    """The run folder (absolute) a result was measured on, or None when it is not on this disk. Results record
    the absolute ``checkpoint_path``; an older one holds the checkpoint as typed, relative to the folder the
    evaluation ran in, which is most often an ancestor of the result file (``<run>/eval/``), so those are
    tried before the current folder: `synco report ../B` must not read ./run1 for B's run1."""
    ck = str(result.get("checkpoint", ""))
    candidates = [Path(result["checkpoint_path"])] if isinstance(result.get("checkpoint_path"), str) else []
    if ck and Path(ck).is_absolute():
        candidates.append(Path(ck))
    elif ck:
        candidates += [folder / ck for folder in Path(os.path.abspath(path)).parents] + [Path.cwd() / ck]
    for c in candidates:
        if _exists(_run_dir(c)):  # the checkpoint file itself may be gone, its run folder is what counts
            return _run_dir(c).resolve()
    return None


def _method_of(result: dict, run: Optional[Path]) -> Optional[str]:
    meta = result.get("backbone_meta") if isinstance(result.get("backbone_meta"), dict) else {}
    if meta.get("method"):
        return str(meta["method"])
    if run is None:
        return None
    path = run / "config.yaml"
    try:
        return str((load_yaml(path.read_text()) or {}).get("method") or "") or None
    except DuplicateKeyError as e:  # which method the run used cannot be told: refuse rather than guess
        raise SyncoError(f"'{path}': {e}") from None
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # no config to read the method from: blank
        return None


def row_identity(result: dict, path: Path = Path(".")) -> tuple[str, dict]:
    """(row key, identity columns) of a result: one row per run, keyed by its resolved folder (two runs both
    named run1 are two rows); a run no longer on disk is keyed by its recorded path and method."""
    ck = str(result.get("checkpoint", "?"))
    backbone = str(result.get("backbone") or "")
    if ck == "random":
        return f"random:{backbone}", {"Method": "random init", "Backbone": backbone, "Run": "random"}
    run = resolve_run(result, path)
    method = _method_of(result, run) or ""
    key = str(run) if run is not None else f"{_run_dir(ck)}|{method}"
    return key, {"Method": method, "Backbone": backbone, "Run": (run or _run_dir(ck)).name or ck}


def _number(value, path: Path, key: str) -> Optional[float]:
    """A result's percentage, or None for an explicit null; anything else (not a number, NaN or infinite, outside
    [0, 100]) means the file was damaged or edited, and printing it would pass for a measured number, while
    dropping it would leave a hole in the table that looks like a missing evaluation."""
    if value is None:
        return None
    problem = number_problem(value, percent=True)
    if problem is None:
        return float(value)
    if problem.startswith("outside"):
        problem += ", and every column of the report is a percentage (top-1, top-5, mAP)"
    raise SyncoError(f"'{path}': {key} is {value!r}, {problem}; the file is damaged or was edited by hand. "
                     "Re-run the evaluation that wrote it, or move the file out of the folders reported.")


def result_columns(result: dict, path: Path = Path("?")) -> list[tuple[str, float]]:
    """(column, value) of one result file, every value checked to be a number."""
    cols = []
    if "report" in result:
        if not isinstance(result["report"], dict):
            _number(result["report"], path, "report")  # raises: not a mapping of numbers
        cols = [(str(k), _number(v, path, f"report[{k!r}]")) for k, v in result["report"].items()]
    elif result.get("protocol") == "knn":
        res = result.get("results")
        if not isinstance(res, dict) or not res or not all(str(k).isdigit() and isinstance(v, dict)
                                                           for k, v in res.items()):
            raise SyncoError(f"'{path}': 'results' is not a mapping from k to top-1/top-5; the file is damaged or "
                             "was edited by hand. Re-run `synco eval knn`, or move the file away.")
        cols = [(f"k-NN k={k}", _number(res[k].get("top1"), path, f"results[{k}].top1"))
                for k in sorted(res, key=int)]
    else:
        for metric, label in (("top1", "top-1"), ("top5", "top-5"), ("map", "mAP")):
            if metric in result:
                cols.append((f"{result['protocol']} {label}", _number(result[metric], path, metric)))
    return [(c, v) for c, v in cols if v is not None]


def create_report(dirs: list) -> tuple[list[dict], list[str]]:
    found = find_results(dirs)
    if not found:
        raise SyncoError(f"no result JSON files (with a 'protocol' key) under {', '.join(map(str, dirs))}; "
                         "run `synco eval ...` first.")
    rows: dict[str, dict] = {}
    cells: dict[tuple[str, str, str], tuple[float, float]] = {}  # (row, column, dataset) -> (mtime, value)
    col_order: dict[str, tuple] = {}
    datasets: dict[str, set] = {}
    for n, (path, result) in enumerate(found):
        protocol = result["protocol"]
        values = result_columns(result, path)  # checked first: a damaged file stops the report before it is written
        if protocol in NOT_ROWS or not values:  # a row of blanks (Run '?') would read as a failed evaluation
            print(f"synco: report: left out {path}: "
                  f"{NOT_ROWS.get(protocol, f'a {protocol} result with no column of this table')}.", file=sys.stderr)
            continue
        key, ident = row_identity(result, path)
        row = rows.setdefault(key, dict(ident))
        for c in ID_COLUMNS:  # fill what an earlier file of the same run could not tell
            row[c] = row[c] or ident[c]
        rank = PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
        dataset = "" if protocol == "transfer" else str(result.get("dataset") or "")
        mtime = path.stat().st_mtime
        for i, (col, value) in enumerate(values):
            col_order.setdefault(col, (rank, n, i))
            datasets.setdefault(col, set()).add(dataset)
            old = cells.get((key, col, dataset))
            if old is None or mtime >= old[0]:
                cells[(key, col, dataset)] = (mtime, value)
    if not rows:
        raise SyncoError(f"no result under {', '.join(map(str, dirs))} has a column of the method x metric table "
                         "(see the notes above); run `synco eval knn|linear|finetune|transfer ...` first.")
    names: dict[tuple[str, str], str] = {}
    columns: list[str] = []
    for col in sorted(col_order, key=lambda c: col_order[c]):
        for ds in sorted(datasets[col]):
            name = f"{col} [{ds}]" if len(datasets[col]) > 1 and ds else col
            names[(col, ds)] = name
            columns.append(name)
    for (key, col, ds), (_, value) in cells.items():
        rows[key][names[(col, ds)]] = value
    return list(rows.values()), ID_COLUMNS + columns


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([f"{r[c]:.4f}" if isinstance(r.get(c), float) else r.get(c, "") for c in columns])
    return buf.getvalue()


def write_report(dirs: list, out: Path = Path(".")) -> tuple[str, Path, Path]:
    rows, columns = create_report(dirs)
    md = markdown_table(rows, columns)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "report.md", out / "report.csv"
    atomic_write_text(md + "\n", md_path)
    atomic_write_text(to_csv(rows, columns), csv_path)
    return md, md_path, csv_path
