"""``synco sweep``: plan the runs of a spec, validate them all, launch what is not finished, evaluate,
aggregate, and write ``sweep.csv``, ``sweep.md``, ``sweep.json`` and PNG plots.

Resuming: a run whose folder holds ``summary.json`` and was made with the same config is skipped; a
run killed earlier is started again with the same command and ``synco pretrain`` continues from its
checkpoint. A folder that holds a run with another config is an error (never overwritten).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .. import resume
from ..config import Config, apply_overrides, load_config, validate
from ..engine.metrics import read_jsonl, training_summary
from ..errors import SyncoError
from ..io import DirLock, atomic_write_text, check_output_dir
from . import stats as S
from .launch import LAUNCHERS, LOCKED, Task, run_tasks
from .spec import Point, SweepSpec, expand_points, load_spec, override_keys, parse_override_list

# Metrics read for every run (when present): summary.json keys, plus linear_top1 from sweep_eval.json.
DEFAULT_METRICS = ("knn_top1", "linear_top1", "final_loss", "pos_cos", "hardest_neg_cos")
PLOT_METRICS = ("knn_top1", "linear_top1")
METRIC_LABELS = {"knn_top1": "k-NN top-1 (%)", "linear_top1": "linear top-1 (%)", "final_loss": "final loss",
                 "pos_cos": "cosine of the positive", "hardest_neg_cos": "cosine of the hardest negative"}


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


@dataclass
class SweepResult:
    out: Path
    runs: list[Run]
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # (run, exit status, log)
    files: list[Path] = field(default_factory=list)
    markdown: str = ""
    table: list[dict] = field(default_factory=list)
    paired: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Planning


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_out(spec: SweepSpec) -> Path:
    return Path("runs") / f"sweep-{spec.name}"


def _world(spec: SweepSpec, launcher: str) -> int:
    gpus = int(spec.slurm.get("gpus") or 0) if launcher == "slurm" else 0
    return max(1, gpus)


def _check_launchable(cfg: Config, world: int, where: str) -> None:
    """What ``synco pretrain`` checks only once it runs, checked for every point before anything starts."""
    gb = cfg.optim.batch_size * world
    if cfg.method != "byol" and cfg.contrast.queue_size % gb:
        raise SyncoError(f"{where}: contrast.queue_size={cfg.contrast.queue_size} must be a multiple of the global "
                         f"batch {gb} (optim.batch_size={cfg.optim.batch_size} x {world} process(es)).")
    d = cfg.data
    if d.root and not Path(d.root).exists():
        raise SyncoError(f"{where}: data.root '{d.root}' does not exist.")
    if d.synthetic_root and d.synthetic_ratio > 0 and not Path(d.synthetic_root).exists():
        raise SyncoError(f"{where}: data.synthetic_root '{d.synthetic_root}' does not exist. Make the synthetic "
                         "clone first (`synco synth-data generate ...`, see the README's Syn2Co section) or pass "
                         "data.synthetic_root=DIR after the spec.")


# Keys that do not change what a run computes (or that a sweep sets per invocation, like threads for --jobs):
# a finished or killed run made with other values of these is still the same run.
# data.root is not one of them: a run on other data is another run, whose numbers differ.
RUN_INVARIANT_KEYS = ("threads", "data.num_workers", "device", "compile", "resume", "log_every", "ckpt_every_steps")


def finished(run_dir: Path) -> bool:
    """Whether a run wrote a readable ``summary.json`` (a JSON object). One torn by a kill, or damaged, is not
    finished: the run is resumed (``synco pretrain`` rewrites it from the last checkpoint), never counted done
    and then left out of the tables unseen."""
    try:
        return isinstance(json.loads((Path(run_dir) / "summary.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def config_differences(saved: dict, current: dict) -> list[str]:
    return [f"{d.key}: saved {d.saved!r} vs now {d.current!r}"
            for d in resume.config_differences(saved, current, RUN_INVARIANT_KEYS)]


def _saved_differences(run_dir: Path, cfg: Config) -> list[str]:
    """Differences between the config saved in ``run_dir`` and ``cfg`` (run-invariant keys aside)."""
    path = run_dir / "config.yaml"
    try:
        saved = load_config(str(path)).to_dict()  # fills fields added to the config since the run was made
    except SyncoError:
        try:
            saved = yaml.safe_load(path.read_text()) or {}
        except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8 text (a binary file)
            return [f"{path} cannot be read"]
        if not isinstance(saved, dict):
            return [f"{path} is not a mapping of config keys"]
    return config_differences(saved, cfg.to_dict())


def plan(spec: SweepSpec, out: Path, extra: Optional[list[str]] = None, seeds: Optional[list[int]] = None,
         launcher: str = "local") -> list[Run]:
    """Every (point, seed) run with its validated config and status. Raises SyncoError before anything runs."""
    extra = list(extra or [])
    keys = override_keys(extra)
    for k in keys:
        if k == "seed":
            raise SyncoError("seed=... cannot be passed to a sweep: the spec's seeds (or --seeds) set it.")
        if k in spec.axis_keys:
            raise SyncoError(f"{k} is swept by the spec's axes; it cannot also be given on the command line.")
    seeds = list(seeds) if seeds is not None else spec.seeds
    world = _world(spec, launcher)
    try:  # the base with the common overrides, once (load_config is slow-ish: type hints, YAML chains)
        common = load_config(spec.base, spec.overrides + extra)
    except SyncoError:
        common = None  # invalid alone (a point's values may fix it): each point is loaded in full below
    runs = []
    for p in expand_points(spec):
        where = f"{spec.origin}, point '{p.name}'"
        try:
            if common is None:
                cfg = load_config(spec.base, spec.overrides + extra + p.overrides)
            else:
                cfg = apply_overrides(copy.deepcopy(common), p.overrides)
                validate(cfg)
        except SyncoError as e:
            hint = ""
            if "data.root" in str(e):
                hint = " Pass it after the spec, e.g. `synco sweep SPEC data.root=/data/imagenet`."
            raise SyncoError(f"{where}: {e}{hint}") from None
        _check_launchable(cfg, world, where)
        for s in seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.seed = s
            runs.append(Run(p, s, Path(out) / p.name / f"seed{s}",
                            spec.overrides + extra + p.overrides + [f"seed={s}"], run_cfg))
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
    return runs


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
    p = Path(base)
    return str(p.resolve()) if (p.suffix in (".yaml", ".yml") or p.exists()) else base


def _synco_cmd(spec: SweepSpec, launcher: str) -> list[str]:
    world = _world(spec, launcher)
    if world > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                "-m", "synco"]
    return [sys.executable, "-m", "synco"]


def _env(threads: Optional[int], cfg: Config) -> dict:
    n = threads if threads is not None else cfg.threads
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)} if n and n > 0 else {}


def pretrain_task(run: Run, spec: SweepSpec, launcher: str, threads: Optional[int]) -> Task:
    cmd = _synco_cmd(spec, launcher) + ["pretrain", "--no-progress", "--config", _base_arg(spec.base),
                                        "--out", str(run.dir.resolve()), *run.overrides]
    if threads is not None:
        cmd.append(f"threads={threads}")
    return Task(run.name, cmd, str(run.dir.resolve() / "log.txt"), _env(threads, run.cfg), os.getcwd(),
                str(run.dir.resolve() / ".sweep.lock"))


# ---------------------------------------------------------------------------------------------
# Linear probe (--linear)


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


def check_linear_options(spec: SweepSpec, runs: list[Run]) -> None:
    """The options each run's `synco eval linear` will get (the spec's linear: section over the run's data), checked
    as that command checks them: a typo or a bad value fails the plan, not the probe after all the pretraining."""
    from ..eval.linear import LinearOptions, check_hparams
    from ..options import apply_dict

    seen = set()
    for r in runs:
        values = linear_options(r, spec)
        key = json.dumps(values, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_hparams(apply_dict(LinearOptions(), values))
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
    v = data.get("linear_top1")
    return float(v) if isinstance(v, (int, float)) else None


def linear_task(run: Run, spec: SweepSpec, launcher: str, threads: Optional[int]) -> Task:
    opts = linear_options(run, spec)
    cmd = [sys.executable, "-m", "synco", "eval", "linear", "--no-progress", "--checkpoint", str(run.dir.resolve()),
           "--out", str(_linear_dir(run, opts).resolve())]
    cmd += [f"{k}={json.dumps(v)}" for k, v in opts.items()]
    return Task(f"{run.name} (linear)", cmd, str(run.dir.resolve() / "linear_log.txt"), _env(threads, run.cfg),
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


# ---------------------------------------------------------------------------------------------
# Metrics of one run


def run_metrics(run_dir: Path, names: list[str]) -> dict[str, float]:
    """Numbers of one finished run: ``summary.json`` keys, ``linear_top1`` from ``sweep_eval.json``, and
    final loss / cosines from the last training record of ``metrics.jsonl`` when the summary lacks them."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    try:
        summary.update({k: v for k, v in json.loads((run_dir / "sweep_eval.json").read_text()).items()
                        if k == "linear_top1"})
    except (OSError, ValueError):
        pass
    if any(name not in summary for name in names):  # summaries written before these keys existed
        summary = {**training_summary(read_jsonl(run_dir / "metrics.jsonl"), None), **summary}
    out = {}
    for name in names:
        v = summary.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[name] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation


def aggregate(spec: SweepSpec, runs: list[Run], metrics: list[str]) -> tuple[list[dict], list[dict], list[str]]:
    """(rows: one per point x metric, paired rows, the metrics that have any value)."""
    by_point: dict[str, list[Run]] = {}
    for r in runs:
        by_point.setdefault(r.point.name, []).append(r)
    values: dict[tuple[str, str], dict[int, float]] = {}
    for name, rs in by_point.items():
        for r in rs:
            for m, v in run_metrics(r.dir, metrics).items():
                values.setdefault((name, m), {})[r.seed] = v
    present = [m for m in metrics if any(k[1] == m for k in values)]
    points = {r.point.name: r.point for r in runs}
    rows = []
    for name, p in points.items():
        for m in present:
            vals = values.get((name, m), {})
            st = S.describe(list(vals.values()))
            rows.append({"point": name, "levels": dict(p.levels), "index": p.index, "metric": m, "stats": st,
                         "seeds": dict(sorted(vals.items())), "runs": len(by_point[name])})
    paired = []
    if spec.compare:
        di = [d.name for d in spec.dims].index(spec.compare.axis)
        dim = spec.dims[di]
        by_index = {p.index: p for p in points.values()}
        contexts = sorted({p.index[:di] + p.index[di + 1:] for p in points.values()})
        for ctx in contexts:
            for a, b in spec.compare.pairs:
                pa = by_index.get(ctx[:di] + (a,) + ctx[di:])
                pb = by_index.get(ctx[:di] + (b,) + ctx[di:])
                if pa is None or pb is None:
                    continue
                context = {k: v for k, v in pa.levels.items() if k != dim.name}
                for m in present:
                    st = S.paired_difference(values.get((pa.name, m), {}), values.get((pb.name, m), {}))
                    paired.append({"axis": dim.name, "a": dim.labels[a], "b": dim.labels[b], "context": context,
                                   "metric": m, "stats": st})
    return rows, paired, present


# ---------------------------------------------------------------------------------------------
# Writing


def _csv(rows: list[dict], spec: SweepSpec, seeds: list[int]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    dims = [d.name for d in spec.dims]
    w.writerow(["point", *dims, "metric", "n", "mean", "std", "ci_low", "ci_high", *[f"seed{s}" for s in seeds]])

    def num(v):
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else repr(float(v))

    for r in rows:
        st = r["stats"]
        w.writerow([r["point"], *[r["levels"][d] for d in dims], r["metric"], st.n, num(st.mean), num(st.std),
                    num(st.ci_low), num(st.ci_high), *[num(r["seeds"].get(s)) for s in seeds]])
    return buf.getvalue()


def _paired_csv(paired: list[dict], spec: SweepSpec) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    others = [d.name for d in spec.dims if spec.compare and d.name != spec.compare.axis]
    w.writerow(["axis", "a", "b", *others, "metric", "n", "mean_diff", "std", "ci_low", "ci_high", "seeds"])
    for p in paired:
        st = p["stats"]
        w.writerow([p["axis"], p["a"], p["b"], *[p["context"][o] for o in others], p["metric"], st.n,
                    *["" if not math.isfinite(v) else repr(v) for v in (st.mean, st.std, st.ci_low, st.ci_high)],
                    " ".join(map(str, st.seeds))])
    return buf.getvalue()


def _md_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
    return "\n".join(out)


def markdown(spec: SweepSpec, rows: list[dict], paired: list[dict], present: list[str], runs: list[Run],
             failed: list, command: str) -> str:
    dims = [d.name for d in spec.dims]
    digits = {m: S.guess_digits(v for r in rows if r["metric"] == m for v in r["seeds"].values()) for m in present}
    text = [f"# Sweep `{spec.name}`", ""]
    if spec.description:
        text += [spec.description.strip(), ""]
    text += [f"Base `{spec.base}`; {len(runs)} runs; cells are mean ± std (ddof 1) [95 % CI, Student t] over "
             "seeds; n/a where fewer than 2 seeds finished.", ""]
    if command:
        text += [f"Command: `{command}`", ""]
    points = list(dict.fromkeys(r["point"] for r in rows))
    lines = []
    for name in points:
        prow = {r["metric"]: r for r in rows if r["point"] == name}
        any_row = next(iter(prow.values()))
        n_done = max(r["stats"].n for r in prow.values())
        ident = [any_row["levels"][d] for d in dims] if dims else [name]
        line = [*ident, f"{n_done}/{any_row['runs']}"]
        for m in present:
            st = prow[m]["stats"]
            cell = S.fmt_stats(st, digits[m])
            if st.n != n_done and st.n:
                cell += f" (n={st.n})"
            line.append(cell)
        lines.append(line)
    if lines:
        text += [_md_table([*(dims or ["point"]), "n", *present], lines), ""]
    else:
        text += ["No run has finished yet.", ""]
    if paired:
        others = [d for d in dims if d != spec.compare.axis]
        plines = [[f"{p['a']} − {p['b']}", *[p["context"][o] for o in others], p["metric"], str(p["stats"].n),
                   S.fmt_stats(p["stats"], digits[p["metric"]], signed=True)] for p in paired]
        text += [f"## Paired differences over common seeds ({spec.compare.axis})", "",
                 _md_table(["difference", *others, "metric", "n", "mean ± std [95 % CI]"], plines), ""]
    if failed:
        text += ["## Failed runs", ""] + [
            f"- `{name}` ({'still being run by another process' if rc == LOCKED else f'exit {rc}'}): see `{log}`"
            for name, rc, log in failed] + [""]
    return "\n".join(text)


def write_outputs(spec: SweepSpec, runs: list[Run], out: Path, failed: list, command: str = "") -> SweepResult:
    metrics = list(dict.fromkeys(list(DEFAULT_METRICS) + spec.metrics))
    rows, paired, present = aggregate(spec, runs, metrics)
    seeds = sorted({r.seed for r in runs})
    out.mkdir(parents=True, exist_ok=True)
    files = []
    md = markdown(spec, rows, paired, present, runs, failed, command)
    for name, text in (("sweep.csv", _csv(rows, spec, seeds)), ("sweep.md", md + "\n")):
        atomic_write_text(text, out / name)
        files.append(out / name)
    if spec.compare:
        atomic_write_text(_paired_csv(paired, spec), out / "sweep_paired.csv")
        files.append(out / "sweep_paired.csv")
    data = {
        "spec": spec.name, "origin": spec.origin, "base": spec.base, "command": command,
        "dims": [{"name": d.name, "keys": d.keys, "levels": d.labels, "values": [list(r) for r in d.rows]}
                 for d in spec.dims],
        "seeds": seeds, "metrics": present,
        "points": [{"name": r["point"], "levels": r["levels"], "metric": r["metric"], **r["stats"].to_dict(),
                    "seed_values": {str(k): v for k, v in r["seeds"].items()}} for r in rows],
        "paired": [{"axis": p["axis"], "a": p["a"], "b": p["b"], "context": p["context"], "metric": p["metric"],
                    **p["stats"].to_dict()} for p in paired],
        "runs": [{"point": r.point.name, "seed": r.seed, "dir": str(r.dir),
                  "finished": finished(r.dir)} for r in runs],
        "failed": [{"run": n, "exit": rc, "log": log} for n, rc, log in failed],
    }
    atomic_write_text(json.dumps(data, indent=2, default=str) + "\n", out / "sweep.json")
    files.append(out / "sweep.json")
    if rows:
        from .plots import sweep_plots

        files += sweep_plots(spec, rows, paired, [m for m in PLOT_METRICS if m in present] or present[:1], out,
                             {m: METRIC_LABELS.get(m, m) for m in present})
    return SweepResult(out, runs, failed, files, md, rows, paired)


# ---------------------------------------------------------------------------------------------
# The whole sweep


def describe_plan(runs: list[Run], tasks: list[Task]) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "resume", "new")}
    lines = [f"{len(runs)} runs: {counts['done']} finished (skipped), {counts['resume']} to resume, "
             f"{counts['new']} to start."]
    lines += [f"  [{r.status:6s}] {r.dir}" for r in runs]
    if tasks:
        lines += ["First command:", "  " + " ".join(tasks[0].cmd)]
    return "\n".join(lines)


def run_sweep(spec_or_name: Any, out: Optional[Path] = None, jobs: Optional[int] = None, launcher: str = "local",
              linear: bool = False, dry_run: bool = False, extra: Optional[list[str]] = None,
              seeds: Optional[list[int]] = None, progress: bool = True, command: str = "") -> SweepResult:
    """Plan, validate, launch what is not finished, (optionally) linear-probe, aggregate and write."""
    if launcher not in LAUNCHERS:
        raise SyncoError(f"unknown launcher '{launcher}' (valid: {', '.join(LAUNCHERS)}).")
    if jobs is not None and jobs < 1:
        raise SyncoError(f"--jobs must be >= 1, got {jobs}.")
    spec = spec_or_name if isinstance(spec_or_name, SweepSpec) else load_spec(str(spec_or_name))
    extra = parse_override_list(list(extra or []), "command-line overrides")
    out = Path(out) if out else default_out(spec)
    runs = plan(spec, out, extra, seeds, launcher)
    check_linear_options(spec, runs)  # not only with --linear: a bad section is a bad spec, found before any run
    todo = [r for r in runs if r.status != "done"]
    tasks = [pretrain_task(r, spec, launcher, threads_for(spec, extra, r.cfg, launcher, jobs)) for r in todo]
    if dry_run:
        print(describe_plan(runs, tasks))
        return SweepResult(out, runs)
    check_output_dir(out, "--out")
    lock = DirLock(out, "sweep").acquire()  # a second sweep on this --out would launch the same runs again
    try:
        return _launch_and_write(spec, runs, todo, tasks, out, extra, seeds, launcher, jobs, linear, progress,
                                 command)
    finally:
        lock.release()


def _launch_and_write(spec, runs, todo, tasks, out, extra, seeds, launcher, jobs, linear, progress,
                      command) -> SweepResult:
    """The sweep's work once planned and locked: launch, (optionally) linear-probe, aggregate and write."""
    record = {"spec": spec.data, "origin": spec.origin, "extra_overrides": extra, "seeds": seeds or spec.seeds,
              "launcher": launcher, "command": command}
    atomic_write_text(yaml.safe_dump(record, sort_keys=False), out / "sweep_spec.yaml")
    print("synco sweep: " + describe_plan(runs, []).splitlines()[0], file=sys.stderr)
    rcs = run_tasks(tasks, launcher, jobs, out, spec.slurm, progress, desc=f"sweep {spec.name}")
    failed = [(t.name, rc, t.log) for t in tasks for rc in [rcs.get(t.name, -1)] if rc != 0]
    # a run counts as finished only if it wrote summary.json, and one that did is not a failure
    failed = [f for f in failed if not any(r.name == f[0] and finished(r.dir) for r in todo)]
    bad = {n for n, _, _ in failed}
    failed += [(r.name, 0, str(r.dir / "log.txt")) for r in todo
               if r.name not in bad and not finished(r.dir)]
    if linear:
        done = [r for r in runs if finished(r.dir)]
        need = [r for r in done if cached_linear(r, spec) is None]
        ltasks = [linear_task(r, spec, launcher, threads_for(spec, extra, r.cfg, launcher, jobs)) for r in need]
        one_gpu = {**spec.slurm, "gpus": min(1, int(spec.slurm["gpus"]))} if spec.slurm.get("gpus") else spec.slurm
        lrcs = run_tasks(ltasks, launcher, jobs, out, one_gpu, progress, desc=f"linear {spec.name}")
        for r, t in zip(need, ltasks):
            if lrcs.get(t.name) == 0 and record_linear(r, spec) is not None:
                continue
            failed.append((t.name, lrcs.get(t.name, -1), t.log))
    return write_outputs(spec, runs, out, failed, command)
