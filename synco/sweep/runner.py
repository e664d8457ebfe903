"""``synco sweep``: plan the runs of a spec, validate them all, launch what is not finished, evaluate,
aggregate, and write ``sweep.csv``, ``sweep.md``, ``sweep.json`` and PNG plots.

Resuming: a run whose folder holds ``summary.json`` and was made with the same config is skipped; a
run killed earlier is started again with the same command and ``synco pretrain`` continues from its
checkpoint. A folder that holds a run with another config is an error (never overwritten).

:func:`run_sweep` is the whole sweep, step by step; the steps live in :mod:`.planning` (the runs, their configs
and commands), :mod:`.probe_cache` (``--linear``) and :mod:`.outputs` (reading, aggregating, writing).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import SyncoError
from ..io import DirLock, atomic_write_text, check_output_dir
from .launch import LAUNCHERS, Task, run_tasks
from .outputs import SweepResult, write_outputs
from .planning import Run, default_out, describe_plan, finished, plan, pretrain_task, threads_for
from .probe_cache import cached_linear, check_linear_options, linear_task, record_linear
from .spec import SweepSpec, load_spec, parse_override_list


def run_sweep(spec_or_name: Any, out: Optional[Path] = None, jobs: Optional[int] = None, launcher: str = "local",
              linear: bool = False, dry_run: bool = False, extra: Optional[list[str]] = None,
              seeds: Optional[list[int]] = None, progress: bool = True, command: str = "") -> SweepResult:
    """Plan, validate, launch what is not finished, (optionally) linear-probe, aggregate and write."""
    # ============ the spec and the command line ============
    if launcher not in LAUNCHERS:
        raise SyncoError(f"unknown launcher '{launcher}' (valid: {', '.join(LAUNCHERS)}).")
    if jobs is not None and jobs < 1:
        raise SyncoError(f"--jobs must be >= 1, got {jobs}.")
    spec = spec_or_name if isinstance(spec_or_name, SweepSpec) else load_spec(str(spec_or_name))
    extra = parse_override_list(list(extra or []), "command-line overrides")
    out = Path(out) if out else default_out(spec)

    # ============ planning: every run's config, checked before anything starts ============
    runs = plan(spec, out, extra, seeds, launcher)
    check_linear_options(spec, runs, probes=linear)  # the section always (a bad one is a bad spec), data if used
    todo = [r for r in runs if r.status != "done"]
    tasks = [pretrain_task(r, spec, launcher, threads_for(spec, extra, r.cfg, launcher, jobs)) for r in todo]
    if dry_run:
        print(describe_plan(runs, tasks))
        return SweepResult(out, runs)

    # ============ one sweep per --out ============
    check_output_dir(out, "--out")
    lock = DirLock(out, "sweep").acquire()  # a second sweep on this --out would launch the same runs again
    try:
        # ============ pretraining what is not finished ============
        # what was asked for (the spec as read, the extra overrides), kept beside the runs it made
        record = {"spec": spec.data, "origin": spec.origin, "extra_overrides": extra, "seeds": seeds or spec.seeds,
                  "launcher": launcher, "command": command}
        atomic_write_text(yaml.safe_dump(record, sort_keys=False), out / "sweep_spec.yaml")
        print("synco sweep: " + describe_plan(runs, []).splitlines()[0], file=sys.stderr)
        rcs = run_tasks(tasks, launcher, jobs, out, spec.slurm, progress, desc=f"sweep {spec.name}")
        failed = _unfinished(todo, tasks, rcs)

        # ============ linear probes of the finished runs (--linear) ============
        if linear:
            failed += _linear_probes(spec, runs, out, extra, launcher, jobs, progress)

        # ============ aggregating and writing ============
        return write_outputs(spec, runs, out, failed, command)
    finally:
        lock.release()


def _unfinished(todo: list[Run], tasks: list[Task], rcs: dict[str, int]) -> list[tuple[str, int, str]]:
    """(run, exit status, log) of each launched run that did not finish. A run counts as finished only if it wrote
    summary.json, whatever its exit status says; one that exited 0 without it is listed with status 0."""
    failed = [(t.name, rc, t.log) for t in tasks for rc in [rcs.get(t.name, -1)] if rc != 0]
    failed = [f for f in failed if not any(r.name == f[0] and finished(r.dir) for r in todo)]
    listed = {n for n, _, _ in failed}
    failed += [(r.name, 0, str(r.dir / "log.txt")) for r in todo if r.name not in listed and not finished(r.dir)]
    return failed


def _linear_probes(spec: SweepSpec, runs: list[Run], out: Path, extra: list[str], launcher: str,
                   jobs: Optional[int], progress: bool) -> list[tuple[str, int, str]]:
    """Probe every finished run whose probe is not cached (on one GPU each); the probes that failed."""
    need = [r for r in runs if finished(r.dir) and cached_linear(r, spec) is None]
    tasks = [linear_task(r, spec, launcher, threads_for(spec, extra, r.cfg, launcher, jobs)) for r in need]
    one_gpu = {**spec.slurm, "gpus": min(1, int(spec.slurm["gpus"]))} if spec.slurm.get("gpus") else spec.slurm
    rcs = run_tasks(tasks, launcher, jobs, out, one_gpu, progress, desc=f"linear {spec.name}")
    failed = []
    for r, t in zip(need, tasks):
        recorded = rcs.get(t.name) == 0 and record_linear(r, spec) is not None  # caches the probe's top-1
        if not recorded:
            failed.append((t.name, rcs.get(t.name, -1), t.log))
    return failed
