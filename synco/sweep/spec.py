"""Sweep specs: parsing, validation and expansion into points and runs.

A spec is a YAML mapping::

    base: cpu-demo                      # a preset name or a config YAML path
    overrides: [epochs=10]              # key=value applied to every point (or a mapping key: value)
    axes:
      grid:                             # cartesian product of the keys' values ...
        negatives.n_hard: [16, 64]
        negatives.counts: [[4,4,4,4,4,4], [16,16,16,16,16,16]]
      zip:                              # ... and/or equal-length lists taken together (one dimension)
        negatives.warmup_epochs: [0, 3]
        negatives.cooldown_epochs: [0, 5]
      labels:                           # optional display names of the levels
        negatives.counts: ["24", "96"]  #   a grid key: one name per value
        zip: ["off", "on"]              #   the zip dimension: one name per row
      names:                            # optional names of the dimensions (default: the key's last part)
        negatives.counts: total
        zip: window
    seeds: 5                            # or a list [0, 1, 2]
    compare: {axis: method, baseline: moby}   # paired differences (see below)
    slurm: {partition: gpu, time: 600, gpus: 1, cpus: 8}
    linear: {epochs: 100}               # options of `synco eval linear` for --linear
    metrics: [knn_top1, final_loss]     # extra summary.json keys to aggregate

``compare``: ``axis`` names a dimension (its name, or its key); ``baseline`` is a
level (value or label) or a list of them, every other level is compared with each baseline; or give
``pairs: [[a, b], ...]`` for explicit ``a − b`` differences. Pairs are formed within equal values of
the other dimensions, over the seeds both points finished.

Each point x seed is one ``synco pretrain`` run in ``OUT/<point>/seed<S>``; the point's name is built
from its levels (``n_hard-16__counts-24``), made filesystem-safe.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import load_yaml
from ..errors import SyncoError
from ..io import find_yaml
from .axes import Dimension, check_section, override_text, parse_axes, slugify

SPEC_KEYS = ("name", "description", "base", "overrides", "axes", "seeds", "compare", "slurm", "linear", "metrics")
SLURM_KEYS = ("cluster", "partition", "time", "gpus", "cpus", "mem_gb", "extra")
MAX_NAME = 120


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Point:
    name: str
    levels: dict  # dimension name -> level label
    values: dict  # config key -> value
    index: tuple  # level index per dimension

    @property
    def overrides(self) -> list[str]:
        return [override_text(k, v) for k, v in self.values.items()]


@dataclass
class Compare:
    axis: str
    pairs: list[tuple[int, int]]  # (a, b) level indices: a − b


@dataclass
class SweepSpec:
    name: str
    origin: str
    base: str
    overrides: list[str]
    dims: list[Dimension]
    seeds: list[int]
    compare: Optional[Compare] = None
    slurm: dict = field(default_factory=dict)
    linear: dict = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    description: str = ""
    data: dict = field(default_factory=dict)  # the spec as read

    @property
    def axis_keys(self) -> list[str]:
        return [k for d in self.dims for k in d.keys]

    def dim(self, name: str) -> Dimension:
        for d in self.dims:
            if d.name == name or name in d.keys:
                return d
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Helpers


def parse_override_list(value: Any, where: str) -> list[str]:
    """A list of ``key=value`` strings, or a mapping ``{key: value}``, as ``key=value`` strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [override_text(str(k), v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(x, str) and "=" in x for x in value):
        return list(value)
    raise SyncoError(f"{where} must be a list of key=value strings (e.g. [epochs=10, contrast.temperature=0.1]) "
                     f"or a mapping of config keys, got {value!r}.")


def override_keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].strip() for o in overrides]


# ---------------------------------------------------------------------------------------------
# Reading


def spec_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("synco.sweeps").iterdir() if p.name.endswith(".yaml"))


def read_spec(path_or_name: str) -> tuple[dict, str, str]:
    """(data, origin, name) of a spec given by path or by the name of a shipped spec."""
    found, is_path = find_yaml(path_or_name, "synco.sweeps")
    if is_path:
        if not found.is_file():
            raise SyncoError(f"sweep spec '{found}' does not exist.")
        text, origin, name = found.read_text(), str(found), found.stem
    elif found is None:
        raise SyncoError(f"unknown sweep spec '{path_or_name}'. Shipped specs: {', '.join(spec_names())}; "
                         "or give the path of a YAML file.")
    else:
        text, origin, name = found.read_text(), f"sweep spec {path_or_name}", path_or_name
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise SyncoError(f"{origin} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SyncoError(f"{origin} must be a YAML mapping with base, axes and seeds.")
    return data, origin, name


def load_spec(path_or_name: str) -> SweepSpec:
    data, origin, name = read_spec(path_or_name)
    spec = parse_spec(data, origin, name)
    base = Path(spec.base)
    if base.suffix in (".yaml", ".yml") and not base.is_absolute() and Path(path_or_name).is_file():
        beside = Path(path_or_name).parent / base
        if beside.is_file() and not base.is_file():  # a base config next to the spec file
            spec.base = str(beside)
    return spec


# ---------------------------------------------------------------------------------------------
# Parsing


def _parse_seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        if value < 1:
            raise SyncoError(f"{where}: 'seeds' must be >= 1 (a count) or a list of seeds, got {value}.")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in value):
        if len(set(value)) != len(value):
            raise SyncoError(f"{where}: 'seeds' lists a seed twice: {value}.")
        return list(value)
    raise SyncoError(f"{where}: 'seeds' must be a count (seeds: 5 means 0..4) or a non-empty list of "
                     f"non-negative integers, got {value!r}.")


def parse_seeds_arg(text: str) -> list[int]:
    """``--seeds 3`` (0, 1, 2) or ``--seeds 0,4,7``."""
    try:
        value = load_yaml(f"[{text}]") if "," in text else load_yaml(text)
    except yaml.YAMLError:
        value = text
    return _parse_seeds(value, "--seeds")


def parse_compare(value: Any, dims: list[Dimension], origin: str) -> Optional[Compare]:
    if value is None:
        return None
    where = f"{origin}: compare"
    if not isinstance(value, dict) or "axis" not in value or not ({"baseline", "pairs"} & set(value)):
        raise SyncoError(f"{where} must be a mapping like {{axis: method, baseline: moby}} or "
                         "{axis: method, pairs: [[synco, moby], [synco, byol]]}.")
    unknown = sorted(set(value) - {"axis", "baseline", "pairs"})
    if unknown:
        raise SyncoError(f"{where}: unknown entry {unknown[0]!r} (valid: axis, baseline, pairs).")
    axis = value["axis"]
    dim = next((d for d in dims if d.name == axis or (len(d.keys) == 1 and d.keys[0] == axis)), None)
    if dim is None:
        raise SyncoError(f"{where}: axis {axis!r} is not a dimension of the sweep "
                         f"(dimensions: {', '.join(d.name for d in dims) or 'none'}).")

    def level(x) -> int:
        i = dim.level_index(x)
        if i is None:
            raise SyncoError(f"{where}: {x!r} is not a level of axis {dim.name!r} "
                             f"(levels: {', '.join(dim.labels)}).")
        return i

    pairs: list[tuple[int, int]] = []
    if "pairs" in value:
        ps = value["pairs"]
        if not isinstance(ps, list) or not all(isinstance(p, list) and len(p) == 2 for p in ps):
            raise SyncoError(f"{where}.pairs must be a list of [a, b] pairs (a − b), got {ps!r}.")
        pairs += [(level(a), level(b)) for a, b in ps]
    if "baseline" in value:
        bases = value["baseline"] if isinstance(value["baseline"], list) else [value["baseline"]]
        idx = [level(b) for b in bases]
        pairs += [(a, b) for b in idx for a in range(len(dim.rows)) if a not in idx]
    if any(a == b for a, b in pairs):
        raise SyncoError(f"{where}: a level is compared with itself.")
    pairs = list(dict.fromkeys(pairs))
    if not pairs:
        raise SyncoError(f"{where}: no pair to compare (axis {dim.name!r} has levels {', '.join(dim.labels)}).")
    return Compare(dim.name, pairs)


def _parse_slurm(value: Any, origin: str) -> dict:
    if value is None:
        return {}
    check_section(value, SLURM_KEYS, f"{origin}: slurm", "like {partition: gpu, time: 600, gpus: 1, cpus: 8}",
                  "Other submitit parameters go under slurm.extra, e.g. {slurm_account: abc}.")
    for key in ("time", "gpus", "cpus"):
        v = value.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "time" else 0)):
            raise SyncoError(f"{origin}: slurm.{key} must be a non-negative integer"
                             f"{' (minutes)' if key == 'time' else ''}, got {v!r}.")
    if value.get("extra") is not None and not isinstance(value["extra"], dict):
        raise SyncoError(f"{origin}: slurm.extra must be a mapping of submitit parameters.")
    return dict(value)


def _check_metric_names(metrics: list[str], origin: str) -> None:
    """Each name is a number summary.json can hold, or linear_top1 (``--linear``): a typo would otherwise be a
    column that never appears, found only after the whole sweep ran."""
    from ..pretrain import SUMMARY_NUMBERS  # what summary.json is written with, in one place

    known = (*SUMMARY_NUMBERS, "linear_top1")
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise SyncoError(f"{origin}: metrics: {', '.join(map(repr, unknown))} is not a number summary.json holds; "
                         f"known: {', '.join(known)}.")


def parse_spec(data: dict, origin: str = "sweep spec", name: str = "sweep") -> SweepSpec:
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise SyncoError(f"{origin}: unknown entry {unknown[0]!r} (valid: {', '.join(SPEC_KEYS)}).")
    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise SyncoError(f"{origin}: 'base' must name a preset (e.g. cpu-demo) or a config YAML file.")
    overrides = parse_override_list(data.get("overrides"), f"{origin}: overrides")
    dims = parse_axes(data.get("axes"), origin)
    if "seeds" not in data:
        raise SyncoError(f"{origin}: 'seeds' is missing; give a count (seeds: 3) or a list (seeds: [0, 1, 2]).")
    seeds = _parse_seeds(data["seeds"], origin)
    axis_keys = [k for d in dims for k in d.keys]
    fixed = set(override_keys(overrides))
    both = sorted(fixed & set(axis_keys))
    if both:
        raise SyncoError(f"{origin}: {both[0]} is both an override and an axis; keep it in one place.")
    if "seed" in fixed:
        raise SyncoError(f"{origin}: 'seed' is set by 'seeds:', not by an override.")
    linear = data.get("linear") or {}
    if not isinstance(linear, dict):
        raise SyncoError(f"{origin}: linear must be a mapping of `synco eval linear` options, e.g. {{epochs: 100}}.")
    metrics = data.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise SyncoError(f"{origin}: metrics must be a list of summary.json keys, e.g. [knn_top1, final_loss].")
    _check_metric_names(metrics, origin)
    description = data.get("description") or ""
    return SweepSpec(name=str(data.get("name") or name), origin=origin, base=base, overrides=overrides,
                     dims=dims, seeds=seeds, compare=parse_compare(data.get("compare"), dims, origin),
                     slurm=_parse_slurm(data.get("slurm"), origin), linear=dict(linear), metrics=list(metrics),
                     description=str(description), data=data)


# ---------------------------------------------------------------------------------------------
# Expansion


def expand_points(spec: SweepSpec) -> list[Point]:
    """Every point of the sweep (the cartesian product of the dimensions), with a unique name."""
    if not spec.dims:
        return [Point("base", {}, {}, ())]
    points, seen = [], {}
    for index in itertools.product(*(range(len(d.rows)) for d in spec.dims)):
        values, levels, parts = {}, {}, []
        for d, i in zip(spec.dims, index):
            values.update(zip(d.keys, d.rows[i]))
            levels[d.name] = d.labels[i]
            parts.append(f"{slugify(d.name)}-{d.slugs[i]}")
        name = "__".join(parts)
        if len(name) > MAX_NAME:
            name = name[:MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        if name in seen:
            raise SyncoError(f"{spec.origin}: points {seen[name]} and {levels} get the same folder name '{name}'; "
                             "give the levels distinct names with axes.labels.")
        seen[name] = levels
        points.append(Point(name, levels, values, tuple(index)))
    return points
