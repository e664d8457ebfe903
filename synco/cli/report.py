"""`synco report DIR... [--out DIR]` and `synco report curves RUN_DIR... [--out PNG]`"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SyncoError


def register(sub) -> None:
    p = sub.add_parser("report", help="collect eval JSON results of several runs into one Markdown/CSV table, "
                                      "or draw training curves (report curves RUN_DIR...)",
                       description="Reads every result JSON (knn.json, linear.json, finetune.json, transfer.json, "
                                   "...) under the given folders and writes report.md and report.csv: one row per "
                                   "backbone (run or random), one column per metric, as in the papers' tables. "
                                   "`synco report curves RUN_DIR [RUN_DIR...] --out curves.png` instead draws the "
                                   "training curves of pretraining runs from their metrics.jsonl: loss, k-NN "
                                   "top-1 (monitor records) and the positive / hardest-negative cosines against "
                                   "epoch, one line per run. (A results folder named curves: write ./curves.)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders (searched recursively) or result JSON files; "
                                                          "or `curves` followed by run directories")
    p.add_argument("--out", default=None, help="where to write report.md and report.csv (default: current folder); "
                                               "for curves, the PNG file (default: curves.png)")
    p.add_argument("--panels", default=None, help="curves only: comma list of loss,knn,cosine (default: all that "
                                                  "the runs logged)")
    p.add_argument("--title", default=None, help="curves only: figure title")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.dirs[0] == "curves" and len(args.dirs) > 1:
        return run_curves(args)
    if args.panels or args.title:
        raise SyncoError("--panels and --title are options of `synco report curves RUN_DIR...`.")
    from ..eval.report import write_report
    from ..io import check_output_dir

    out = check_output_dir(Path(args.out or "."), "--out")  # before any result is read
    md, md_path, csv_path = write_report(args.dirs, out)
    print(md)
    print(f"synco: wrote {md_path} and {csv_path}", file=sys.stderr)
    return 0


def run_curves(args) -> int:
    from ..io import check_output_dir
    from ..viz.curves import DEFAULT_PANELS, plot_curves, png_path

    panels = [p.strip() for p in args.panels.split(",") if p.strip()] if args.panels else list(DEFAULT_PANELS)
    out = png_path(args.out or "curves.png")
    check_output_dir(out.parent, "the folder of --out")  # before any run is read
    if out.is_dir():
        raise SyncoError(f"--out '{out}' is a folder; give the PNG file to write, or a folder without it.")
    path = plot_curves(args.dirs[1:], out, panels=panels, title=args.title)
    print(f"synco: wrote {path}", file=sys.stderr)
    return 0
