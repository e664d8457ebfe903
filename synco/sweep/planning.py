"""Planning a sweep: every (point, seed) run with its config, checked before anything starts; whether each run is
new, to resume or done; and the ``synco pretrain`` command that runs it.

A point's config is built in one step, ``load_config(base, spec overrides + command-line overrides + the point's
values)``, the path ``synco pretrain --config BASE key=value ...`` takes; a command-line override replaces the spec's
value of the same key (:func:`synco.options.layer_overrides`: one ``key=value`` per key reaches ``synco pretrain``,
which refuses a key given twice with different values). So whatever the config derives from its
values (a ViT built for ``data.image_size``) is derived from the point's values, never carried over from a config
built for the shared ones.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .. import resume
from ..config import Config, load_config
from ..errors import SyncoError
from ..io import find_yaml
from ..methods import queue_fit_error
from ..options import DuplicateKeyError, layer_overrides, load_yaml, option_leaves, parse_override
from .launch import Task
from .spec import Point, SweepSpec, expand_points, override_keys


@dataclass
class Run:
    point: Point
    seed: int
    dir: Path
    overrides: list[str]  # everything but threads
    cfg: Config
    status: str = "new"  # new | resume | done

    @property
    def name(self) -> str:
        return f"{self.point.name}/seed{self.seed}"


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_out(spec: SweepSpec) -> Path:
    return Path("runs") / f"sweep-{spec.name}"


def world_size(spec: SweepSpec, launcher: str) -> int:
    """Processes per run: the spec's GPUs per SLURM job, else one."""
    gpus = int(spec.slurm.get("gpus") or 0) if launcher == "slurm" else 0
    return max(1, gpus)


# ---------------------------------------------------------------------------------------------
# The runs and their configs


def plan(spec: SweepSpec, out: Path, extra: Optional[list[str]] = None, seeds: Optional[list[int]] = None,
         launcher: str = "local") -> list[Run]:
    """Every (point, seed) run with its validated config and status. Raises SyncoError before anything runs."""
    extra = list(extra or [])
    _check_extra(spec, extra)
    seeds = list(seeds) if seeds is not None else spec.seeds
    world = world_size(spec, launcher)
    runs = []
    with _each_note_once():
        for p in expand_points(spec):
            cfg = point_config(spec, p, extra, world)
            overrides = point_overrides(spec, p, extra)
            for s in seeds:
                run_cfg = copy.deepcopy(cfg)
                run_cfg.seed = s
                runs.append(Run(p, s, Path(out) / p.name / f"seed{s}", overrides + [f"seed={s}"], run_cfg))
        _set_status(runs)
    return runs


@contextlib.contextmanager
def _each_note_once():
    """The config's notes (a value adjusted, a setting unused) once per message while a sweep is planned: every
    point's config and every run's saved one is loaded, and the same note 35 times hides the one that differs."""
    seen: set[str] = set()

    def first_time(record: logging.LogRecord) -> bool:
        new = record.getMessage() not in seen
        seen.add(record.getMessage())
        return new

    logger = logging.getLogger("synco.config")
    logger.addFilter(first_time)
    try:
        yield
    finally:
        logger.removeFilter(first_time)


def _check_extra(spec: SweepSpec, extra: list[str]) -> None:
    """Command-line overrides may add to every run, not take what the spec's seeds and axes set."""
    for text in extra:
        key, value = parse_override(text)
        for k in option_leaves(key, value):  # model={proj_dim: 8} gives model.proj_dim as much as the dotted form
            if k == "seed":
                raise SyncoError("seed=... cannot be passed to a sweep: the spec's seeds (or --seeds) set it.")
            if k in spec.axis_keys:
                raise SyncoError(f"{k} is swept by the spec's axes; it cannot also be given on the command line "
                                 f"('{text}').")


def point_overrides(spec: SweepSpec, point: Point, extra: list[str]) -> list[str]:
    """The point's ``key=value`` list: the spec's overrides, replaced key by key by the command line's, then the
    point's values (keys the other two cannot hold: parse_spec and _check_extra refuse that)."""
    return layer_overrides(spec.overrides, extra, point.overrides, owner="config key")


def point_config(spec: SweepSpec, point: Point, extra: list[str], world: int) -> Config:
    """The point's config as ``synco pretrain`` builds it, checked as that command checks it once it runs."""
    where = f"{spec.origin}, point '{point.name}'"
    try:
        cfg = load_config(spec.base, point_overrides(spec, point, extra))
    except SyncoError as e:
        hint = ""
        if "data.root" in str(e):
            hint = " Pass it after the spec, e.g. `synco sweep SPEC data.root=/data/imagenet`."
        raise SyncoError(f"{where}: {e}{hint}") from None
    check_launchable(cfg, world, where)
    return cfg


def check_launchable(cfg: Config, world: int, where: str) -> None:
    """What ``synco pretrain`` checks only once it runs, checked for every point before anything starts."""
    misfit = queue_fit_error(cfg, cfg.optim.batch_size * world,
                             f"optim.batch_size={cfg.optim.batch_size} x {world} process(es)")
    if misfit:
        raise SyncoError(f"{where}: {misfit}")
    d = cfg.data
    if d.root and not Path(d.root).exists():
        raise SyncoError(f"{where}: data.root '{d.root}' does not exist.")
    if d.synthetic_root and d.synthetic_ratio > 0 and not Path(d.synthetic_root).exists():
        raise SyncoError(f"{where}: data.synthetic_root '{d.synthetic_root}' does not exist. Make the synthetic "
                         "clone first (`synco synth-data generate ...`, see the README's Syn2Co section) or pass "
                         "data.synthetic_root=DIR after the spec.")


# ---------------------------------------------------------------------------------------------
# What each run's folder already holds


def finished(run_dir: Path) -> bool:
    """Whether a run wrote a readable ``summary.json`` (a JSON object whose numbers are finite numbers). One torn by
    a kill, or damaged (a NaN or a string for a number), is not finished: the run is resumed (``synco pretrain``
    rewrites it from the last checkpoint), never counted done and then averaged in or left out of the tables
    unseen."""
    from ..pretrain import summary_damage

    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and not summary_damage(summary)


def run_difference_lines(saved: dict, current: dict) -> list[str]:
    """What makes a run saved in a folder another run than the one planned: differences in anything but the settings
    that change no result (a finished or killed run made with other threads or devices is the same run)."""
    return [f"{d.key}: saved {d.saved!r} vs now {d.current!r}"
            for d in resume.config_differences(saved, current, resume.RESULT_INVARIANT_KEYS)]


def _saved_differences(run_dir: Path, cfg: Config) -> list[str]:
    """Differences between the config saved in ``run_dir`` and ``cfg`` (run-invariant keys aside)."""
    path = run_dir / "config.yaml"
    try:
        saved = load_config(str(path)).to_dict()  # fills fields added to the config since the run was made
    except SyncoError:
        try:
            saved = load_yaml(path.read_text()) or {}  # synco's loader: a key given twice is refused, not dropped
        except DuplicateKeyError as e:  # name the key and its lines, not only "cannot be read"
            return [f"{path}: {e}"]
        except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8 text (a binary file)
            return [f"{path} cannot be read"]
        if not isinstance(saved, dict):
            return [f"{path} is not a mapping of config keys"]
    return run_difference_lines(saved, cfg.to_dict())


def _set_status(runs: list[Run]) -> None:
    """Each run done, to resume or new, from its folder; a folder holding a run with another config is an error
    (a sweep never overwrites runs)."""
    mismatched = []
    for r in runs:
        if (r.dir / "config.yaml").exists():
            diffs = _saved_differences(r.dir, r.cfg)
            if diffs:
                mismatched.append((r, diffs))
                continue
            r.status = "done" if finished(r.dir) else "resume"
        elif (r.dir / "checkpoint.pt").exists():
            r.status = "resume"
    if mismatched:
        r, diffs = mismatched[0]
        more = f" ({len(mismatched) - 1} more folder(s) likewise)" if len(mismatched) > 1 else ""
        raise SyncoError(f"'{r.dir}' holds a run made with another config ({'; '.join(diffs[:4])}){more}. A sweep "
                         "never overwrites runs: use another --out, the same spec and key=value arguments as "
                         "before, or delete that folder.")


def describe_plan(runs: list[Run], tasks: list[Task]) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "resume", "new")}
    lines = [f"{len(runs)} runs: {counts['done']} finished (skipped), {counts['resume']} to resume, "
             f"{counts['new']} to start."]
    lines += [f"  [{r.status:6s}] {r.dir}" for r in runs]
    if tasks:
        lines += ["First command:", "  " + " ".join(tasks[0].cmd)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Commands


def threads_for(spec: SweepSpec, extra: list[str], cfg: Config, launcher: str, jobs: Optional[int]) -> Optional[int]:
    """CPU threads per run: what the spec or command line set; else the cores split between the jobs
    (never more than the base preset asks for, e.g. cpu-demo's 1)."""
    if "threads" in override_keys(spec.overrides + extra) or "threads" in spec.axis_keys:
        return None
    if launcher == "slurm":
        return int(spec.slurm["cpus"]) if spec.slurm.get("cpus") else None
    budget = max(1, cpu_cores() // max(1, jobs or 1))
    return min(budget, cfg.threads) if cfg.threads > 0 else budget


def _base_arg(base: str) -> str:
    """The base as the run's command gets it: a path made absolute, a preset's name as it is."""
    found, is_path = find_yaml(base, "synco.presets")
    return str(found.resolve()) if is_path else base


def _synco_cmd(spec: SweepSpec, launcher: str) -> list[str]:
    world = world_size(spec, launcher)
    if world > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                "-m", "synco"]
    return [sys.executable, "-m", "synco"]


def task_env(threads: Optional[int], cfg: Config) -> dict:
    """The thread counts of a run's BLAS and OpenMP, as its config or the sweep's split sets them."""
    n = threads if threads is not None else cfg.threads
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)} if n and n > 0 else {}


def pretrain_task(run: Run, spec: SweepSpec, launcher: str, threads: Optional[int]) -> Task:
    cmd = _synco_cmd(spec, launcher) + ["pretrain", "--no-progress", "--config", _base_arg(spec.base),
                                        "--out", str(run.dir.resolve()), *run.overrides]
    if threads is not None:
        cmd.append(f"threads={threads}")
    return Task(run.name, cmd, str(run.dir.resolve() / "log.txt"), task_env(threads, run.cfg), os.getcwd(),
                str(run.dir.resolve() / ".sweep.lock"))
