"""`synco sweep SPEC [key=value ...] [--jobs N] [--launcher local|slurm] [--out DIR] [--linear] [--dry-run]`"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def register(sub) -> None:
    from ..sweep.spec import spec_names

    p = sub.add_parser(
        "sweep", help="many pretraining runs from one spec (grid/zip x seeds), aggregated with 95%% CIs",
        description="Runs every point x seed of a sweep spec as an ordinary `synco pretrain` run in "
                    "OUT/<point>/seed<S>, skipping finished runs and resuming killed ones, then writes "
                    "sweep.csv, sweep.md, sweep.json and PNG plots (mean ± std, Student-t 95% CI, paired "
                    "differences). SPEC is a YAML file or a shipped spec: "
                    f"{', '.join(spec_names())}. key=value arguments after SPEC are added to every run "
                    "(e.g. data.root=/data/imagenet for the imagenet100 specs).")
    p.add_argument("spec", nargs="?", help="sweep spec (YAML path or shipped name); omit to list the shipped ones")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (local, default 1; CPU threads are split between them) or the job "
                        "array's parallelism (slurm, default unlimited)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local subprocesses, or SLURM jobs through submitit (the spec's slurm: section)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/sweep-<spec name>)")
    p.add_argument("--linear", action="store_true",
                   help="also linear-probe every finished run (`synco eval linear`, options from the spec's "
                        "linear: section; cached in each run's sweep_eval.json)")
    p.add_argument("--seeds", default=None, help="override the spec's seeds: a count (3) or a list (0,1,2)")
    p.add_argument("--dry-run", action="store_true", help="validate every run and show the plan; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..sweep.spec import load_spec, parse_seeds_arg, spec_names

    if not args.spec:
        print("Shipped sweep specs (synco sweep NAME):")
        for name in spec_names():
            spec = load_spec(name)
            first = spec.description.strip().splitlines()[0] if spec.description.strip() else ""
            print(f"  {name:28s} {first}")
        return 0
    from ..sweep.launch import LOCKED
    from ..sweep.runner import run_sweep

    spec = load_spec(args.spec)
    seeds = parse_seeds_arg(args.seeds) if args.seeds is not None else None
    command = shlex.join(["synco", "sweep", *sys.argv[2:]]) if len(sys.argv) > 1 and sys.argv[1] == "sweep" else ""
    result = run_sweep(spec, out=Path(args.out) if args.out else None, jobs=args.jobs, launcher=args.launcher,
                       linear=args.linear, dry_run=args.dry_run, extra=list(args.overrides or []), seeds=seeds,
                       progress=not args.no_progress, command=command)
    if args.dry_run:
        return 0
    print(result.markdown)
    print(f"synco: wrote {', '.join(str(f) for f in result.files)}", file=sys.stderr)
    if result.failed:
        print(f"synco: {len(result.failed)} run(s) failed or did not finish:", file=sys.stderr)
        for name, rc, log in result.failed:
            why = "still being run by another process" if rc == LOCKED else f"exit {rc}"
            print(f"  {name} ({why}): {log}", file=sys.stderr)
        print("synco: the others are aggregated above; re-run the same command to retry the failed ones.",
              file=sys.stderr)
        return 2
    return 0
