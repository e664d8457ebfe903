"""Pool the seeds of sweeps run apart (a first set and a confirmation set of seeds) and print, per strategy and
metric, mean ± std [95 % CI] over all seeds and the paired difference against a baseline on the common seeds.

    python benchmarks/pool_sweeps.py runs/sweep-hard-negatives-digits runs/sweep-hard-negatives-confirm \
        --axis strategy --baseline moby --metrics knn_top1 linear_top1

The sweeps must not share seeds: a seed measured twice would count twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from synco.sweep.stats import describe, paired_difference


def seed_values(sweep_dir: Path, axis: str) -> dict[tuple[str, str], dict[int, float]]:
    data = json.loads((sweep_dir / "sweep.json").read_text())
    return {(p["levels"][axis], p["metric"]): {int(s): v for s, v in p["seed_values"].items()}
            for p in data["points"]}


def pooled(dirs: list[Path], axis: str) -> dict[tuple[str, str], dict[int, float]]:
    out: dict[tuple[str, str], dict[int, float]] = {}
    for d in dirs:
        for key, values in seed_values(d, axis).items():
            twice = set(out.get(key, {})) & set(values)
            if twice:
                sys.exit(f"{d}: seeds {sorted(twice)} of {key} are already in an earlier sweep")
            out.setdefault(key, {}).update(values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+", type=Path)
    ap.add_argument("--axis", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--metrics", nargs="+", default=["knn_top1", "linear_top1"])
    args = ap.parse_args()
    values = pooled(args.sweeps, args.axis)
    levels = list(dict.fromkeys(level for level, _ in values))
    print(f"| {args.axis} | metric | n | mean ± std [95 % CI] | paired − {args.baseline} [95 % CI] |")
    print("|---|---|---|---|---|")
    for m in args.metrics:
        base = values.get((args.baseline, m), {})
        for level in levels:
            v = values.get((level, m))
            if not v:
                continue
            d = describe(list(v.values()))
            diff = ""
            if level != args.baseline:
                p = paired_difference(v, base)
                diff = f"{p.mean:+.2f} ± {p.std:.2f} [{p.ci_low:+.2f}, {p.ci_high:+.2f}] (n={p.n})"
            print(f"| {level} | {m} | {d.n} | {d.mean:.2f} ± {d.std:.2f} [{d.ci_low:.2f}, {d.ci_high:.2f}] | {diff} |")


if __name__ == "__main__":
    main()
