"""`synco report DIR...`: the JSON results of several runs in one table, laid out like the papers'
tables: one row per evaluated backbone (a pretraining run, or ``random``), one column per metric.

Every ``*.json`` under the given folders that carries a ``protocol`` key is read (files marked
``part_of`` another result, e.g. the per-dataset files of ``transfer``, are skipped). Columns come
from the result's ``report`` mapping (``{"column": number}``; any protocol can add one), or for
k-NN from its per-k top-1 (``k-NN k=20``, Table 12). A column measured on more than one dataset
gets the dataset in brackets. When two files give the same cell, the newer file wins.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

import yaml

from ..errors import SyncoError
from ..io import atomic_write_text
from .results import markdown_table

PROTOCOL_ORDER = ("knn", "linear", "finetune", "transfer")
ID_COLUMNS = ["Method", "Backbone", "Run"]


def find_results(dirs: list) -> list[tuple[Path, dict]]:
    found = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise SyncoError(f"'{d}' does not exist; give folders holding result JSON files (e.g. a run's eval/).")
        files = [d] if d.is_file() else sorted(p for p in d.rglob("*.json")
                                               if not any(part.startswith(".") for part in p.relative_to(d).parts))
        for f in files:
            try:
                data = json.loads(f.read_text())
            except (ValueError, OSError):
                continue
            if isinstance(data, dict) and isinstance(data.get("protocol"), str) and not data.get("part_of"):
                found.append((f, data))
    return found


def _run_dir(checkpoint: str) -> Path:
    p = Path(checkpoint)
    return p.parent if p.suffix in (".pt", ".safetensors") else p


def _method_of(result: dict) -> Optional[str]:
    meta = result.get("backbone_meta") or {}
    if meta.get("method"):
        return str(meta["method"])
    cfg = _run_dir(str(result.get("checkpoint", ""))) / "config.yaml"
    try:
        return str((yaml.safe_load(cfg.read_text()) or {}).get("method") or "") or None
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def row_identity(result: dict) -> tuple[str, dict]:
    """(row key, identity columns) of a result: one row per backbone checkpoint."""
    ck = str(result.get("checkpoint", "?"))
    backbone = str(result.get("backbone") or "")
    if ck == "random":
        return f"random:{backbone}", {"Method": "random init", "Backbone": backbone, "Run": "random"}
    run = _run_dir(ck)
    try:
        key = str(run.resolve()) if run.exists() else str(run)
    except OSError:
        key = str(run)
    return key, {"Method": _method_of(result) or "", "Backbone": backbone, "Run": run.name or ck}


def result_columns(result: dict) -> list[tuple[str, float]]:
    if isinstance(result.get("report"), dict):
        return [(str(k), float(v)) for k, v in result["report"].items() if isinstance(v, (int, float))]
    if result.get("protocol") == "knn" and isinstance(result.get("results"), dict):
        ks = sorted(result["results"], key=lambda k: int(k))
        return [(f"k-NN k={k}", float(result["results"][k]["top1"])) for k in ks]
    cols = []
    for metric, label in (("top1", "top-1"), ("top5", "top-5"), ("map", "mAP")):
        if isinstance(result.get(metric), (int, float)):
            cols.append((f"{result['protocol']} {label}", float(result[metric])))
    return cols


def build_report(dirs: list) -> tuple[list[dict], list[str]]:
    found = find_results(dirs)
    if not found:
        raise SyncoError(f"no result JSON files (with a 'protocol' key) under {', '.join(map(str, dirs))}; "
                         "run `synco eval ...` first.")
    rows: dict[str, dict] = {}
    cells: dict[tuple[str, str, str], tuple[float, float]] = {}  # (row, column, dataset) -> (mtime, value)
    col_order: dict[str, tuple] = {}
    datasets: dict[str, set] = {}
    for n, (path, result) in enumerate(found):
        key, ident = row_identity(result)
        row = rows.setdefault(key, dict(ident))
        for c in ID_COLUMNS:  # fill what an earlier file of the same run could not tell
            row[c] = row[c] or ident[c]
        protocol = result["protocol"]
        rank = PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
        dataset = "" if protocol == "transfer" else str(result.get("dataset") or "")
        mtime = path.stat().st_mtime
        for i, (col, value) in enumerate(result_columns(result)):
            col_order.setdefault(col, (rank, n, i))
            datasets.setdefault(col, set()).add(dataset)
            old = cells.get((key, col, dataset))
            if old is None or mtime >= old[0]:
                cells[(key, col, dataset)] = (mtime, value)
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
    rows, columns = build_report(dirs)
    md = markdown_table(rows, columns)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "report.md", out / "report.csv"
    atomic_write_text(md + "\n", md_path)
    atomic_write_text(to_csv(rows, columns), csv_path)
    return md, md_path, csv_path
