"""`synco report DIR... [--out DIR]`"""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="collect eval JSON results of several runs into one Markdown/CSV table",
                       description="Reads every result JSON (knn.json, linear.json, finetune.json, transfer.json, "
                                   "...) under the given folders and writes report.md and report.csv: one row per "
                                   "backbone (run or random), one column per metric, as in the papers' tables.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders (searched recursively) or result JSON files")
    p.add_argument("--out", default=".", help="where to write report.md and report.csv (default: current folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.report import write_report

    md, md_path, csv_path = write_report(args.dirs, Path(args.out))
    print(md)
    print(f"synco: wrote {md_path} and {csv_path}", file=sys.stderr)
    return 0
