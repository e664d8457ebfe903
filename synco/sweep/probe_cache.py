"""The sweep's linear probes (``synco sweep --linear``): one ``synco eval linear`` per finished run, its top-1 cached
in the run's ``sweep_eval.json``.

The cache is keyed by the probe's options and the hash of the run's ``summary.json``: a probe with other options,
or of a run trained again, is run again. Each probe writes to its own ``eval/linear-<hash>`` folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import SyncoError
from ..eval.results import number_problem
from ..io import atomic_write_text
from .launch import Task
from .planning import Run, finished, task_env
from .spec import SweepSpec


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def linear_options(run: Run, spec: SweepSpec) -> dict:
    d = run.cfg.data
    opts = {"dataset": d.dataset, "seed": run.seed, "num_workers": d.num_workers}
    if d.root:
        opts["root"] = d.root
    if d.class_list:
        opts["class_list"] = d.class_list
    opts.update(spec.linear)
    return opts


def check_linear_options(spec: SweepSpec, runs: list[Run], probes: bool = False) -> None:
    """The options each run's `synco eval linear` will get (the spec's linear: section over the run's data), checked
    as that command checks them: a typo or a bad value fails the plan, not the probe after all the pretraining.
    ``probes`` (``--linear``): the probes will run, so their data must be there too (train/ and val/)."""
    from ..data.build import check_split_dirs
    from ..eval.linear import LinearOptions
    from ..eval.probe import check_recipe
    from ..options import apply_dict

    seen = set()
    for r in runs:
        values = linear_options(r, spec)
        key = json.dumps(values, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            opts = apply_dict(LinearOptions(), values)
            check_recipe(opts)
            if probes and opts.dataset != "digits" and opts.root:  # the probe reads train/ and val/
                check_split_dirs(opts.root)
        except SyncoError as e:
            raise SyncoError(f"{spec.origin}, linear: section (the options of `synco eval linear`): {e}") from None


def _linear_dir(run: Run, opts: dict) -> Path:
    h = hashlib.sha1((json.dumps(opts, sort_keys=True, default=str) + _sha1(run.dir / "summary.json")).encode())
    return run.dir / "eval" / f"linear-{h.hexdigest()[:8]}"


def cached_linear(run: Run, spec: SweepSpec) -> Optional[float]:
    path = run.dir / "sweep_eval.json"
    if not path.exists() or not finished(run.dir):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("linear_options") != json.loads(json.dumps(linear_options(run, spec), default=str)) or \
            data.get("summary_sha1") != _sha1(run.dir / "summary.json"):
        return None
    return linear_top1_of(data)


def linear_top1_of(data) -> Optional[float]:
    """The top-1 a ``sweep_eval.json`` holds, or None when it holds no percentage (damaged or edited by hand: NaN,
    150, a string), which is then probed again rather than averaged in."""
    v = data.get("linear_top1") if isinstance(data, dict) else None
    return None if number_problem(v, percent=True) else float(v)


def linear_task(run: Run, spec: SweepSpec, launcher: str, threads: Optional[int]) -> Task:
    opts = linear_options(run, spec)
    cmd = [sys.executable, "-m", "synco", "eval", "linear", "--no-progress", "--checkpoint", str(run.dir.resolve()),
           "--out", str(_linear_dir(run, opts).resolve())]
    cmd += [f"{k}={json.dumps(v)}" for k, v in opts.items()]
    return Task(f"{run.name} (linear)", cmd, str(run.dir.resolve() / "linear_log.txt"), task_env(threads, run.cfg),
                os.getcwd(), str(run.dir.resolve() / ".sweep.lock"))


def record_linear(run: Run, spec: SweepSpec) -> Optional[float]:
    """Read the finished probe's top-1 into ``sweep_eval.json``."""
    opts = linear_options(run, spec)
    path = _linear_dir(run, opts) / "linear.json"
    try:
        top1 = float(json.loads(path.read_text())["best"]["top1"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    data = {"linear_top1": top1, "linear_result": str(path),
            "linear_options": json.loads(json.dumps(opts, default=str)),
            "summary_sha1": _sha1(run.dir / "summary.json")}
    atomic_write_text(json.dumps(data, indent=2) + "\n", run.dir / "sweep_eval.json")
    return top1
