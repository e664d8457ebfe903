"""Results as JSON (written atomically) plus compact Markdown tables."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..io import atomic_write_text


def save_result(out_dir: Path, name: str, result: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    ck = result.get("checkpoint")
    if isinstance(ck, str) and ck != "random" and "checkpoint_path" not in result:
        # the path as typed is relative to the folder the command ran in: `synco report` needs the run itself
        result = {**result, "checkpoint_path": os.path.abspath(ck)}
    atomic_write_text(json.dumps(result, indent=2, default=str) + "\n", path)
    return path


def number_problem(value, percent: bool = False) -> Optional[str]:
    """Why a number read back from a result file (summary.json, knn.json, a sweep's cache) cannot be used: not a
    number, not finite, or a percentage outside [0, 100]; None when it can. One that cannot was damaged or edited
    by hand, and neither averaging it nor dropping it unseen would be honest."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not a number"
    if not math.isfinite(value):
        return "not a finite number"
    if percent and not 0 <= value <= 100:
        return "outside [0, 100]"
    return None


def markdown_table(rows: Iterable[dict], columns: Sequence[str], floatfmt: str = ".2f") -> str:
    def cell(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
