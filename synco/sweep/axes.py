"""The axes of a sweep: its ``axes:`` section (grid keys, the zip group, labels, names) parsed into
:class:`Dimension` s, and the text of the values they take (labels, folder names, overrides).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import SyncoError

AXES_KEYS = ("grid", "zip", "labels", "names")


@dataclass
class Dimension:
    """One axis of the sweep: a grid key (one key) or the zip group (several keys taken together)."""

    name: str
    keys: list[str]
    rows: list[tuple]  # one tuple of values (one per key) per level
    labels: list[str]  # display name of each level
    slugs: list[str]  # filesystem-safe name of each level
    labelled: bool = False  # the spec gave the labels

    @property
    def numeric(self) -> bool:
        """A single key whose values are all numbers (not booleans): plotted as a line."""
        return len(self.keys) == 1 and all(_is_number(r[0]) for r in self.rows)

    def level_index(self, level: Any) -> Optional[int]:
        """Index of a level given by label, value (a single-key dimension) or the value's text."""
        for i, (row, label) in enumerate(zip(self.rows, self.labels)):
            if str(level) == label:
                return i
            if len(row) == 1 and (_same_value(level, row[0]) or str(level) == value_text(row[0])):
                return i
        return None


# ---------------------------------------------------------------------------------------------
# Values and their text


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if _is_number(a) and _is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def value_text(v: Any) -> str:
    """Compact text of a value: ``0.2``, ``true``, ``[4,4,4,4,4,4]``, ``moby``."""
    if isinstance(v, str):
        return v
    return json.dumps(v, separators=(",", ":"))


def override_text(key: str, value: Any) -> str:
    """``key=value`` with the value as JSON, which the config's YAML parser reads back unchanged."""
    return f"{key}={json.dumps(value)}"


def slugify(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_")
    s = s.lstrip(".") or "x"
    if len(s) > 40:
        s = s[:32] + "-" + hashlib.sha1(s.encode()).hexdigest()[:6]
    return s


def _value_slug(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "_".join(_value_slug(x) for x in v) or "empty"
    if isinstance(v, dict):
        return "_".join(f"{k}_{_value_slug(x)}" for k, x in v.items()) or "empty"
    return slugify(value_text(v))


def short_names(keys: list[str]) -> dict[str, str]:
    """The last component of each dotted key, or the whole key where two last components clash."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


# ---------------------------------------------------------------------------------------------
# Parsing


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise SyncoError(f"{where}: axis key {key!r} is not a dotted config key like contrast.temperature.")
    if key == "seed":
        raise SyncoError(f"{where}: 'seed' cannot be an axis; list the seeds under 'seeds:' instead.")
    return key


def _labels_for(labels: Any, n: int, where: str) -> Optional[list[str]]:
    if labels is None:
        return None
    if not isinstance(labels, list) or len(labels) != n or not all(isinstance(x, (str, int, float)) for x in labels):
        raise SyncoError(f"{where} must be a list of {n} names (one per level), got {labels!r}.")
    out = [str(x) for x in labels]
    if len(set(out)) != n:
        raise SyncoError(f"{where} names a level twice: {out}.")
    return out


def _dimension(name: str, keys: list[str], rows: list[tuple], labels: Optional[list[str]]) -> Dimension:
    if labels is not None:
        slugs = [slugify(x) for x in labels]
        text = labels
    else:
        text = [", ".join(value_text(v) for v in row) for row in rows]
        slugs = ["-".join(_value_slug(v) for v in row) for row in rows]
    return Dimension(name, keys, rows, list(text), slugs, labelled=labels is not None)


def parse_axes(axes: Any, origin: str) -> list[Dimension]:
    """The sweep's dimensions: one per grid key, then the zip group (its keys taken together) as one."""
    where = f"{origin}: axes"
    if axes is None:
        return []
    grid, zipped, labels, names = _axes_sections(axes, where)
    for key in [*grid, *zipped]:
        _check_key(key, where)
    shorts = short_names(list(grid) + list(zipped))
    dims = [_grid_dimension(key, values, labels, names.get(key, shorts[key]), where) for key, values in grid.items()]
    if zipped:
        dims.append(_zip_dimension(zipped, labels, names, shorts, where))
    _check_labels_and_names(dims, grid, zipped, labels, names, where)
    return dims


def check_section(value: Any, keys: tuple, where: str, shape: str, hint: str) -> None:
    """A spec section is a mapping of known keys: ``shape`` says what a mapping of it looks like, ``hint`` where an
    unknown key belongs."""
    if not isinstance(value, dict):
        raise SyncoError(f"{where} must be a mapping {shape}.")
    unknown = sorted(set(value) - set(keys), key=str)
    if unknown:
        raise SyncoError(f"{where}: unknown entry {', '.join(map(repr, unknown))} (valid: {', '.join(keys)}). {hint}")


def _axes_sections(axes: Any, where: str) -> tuple[dict, dict, dict, dict]:
    """(grid, zip, labels, names) of ``axes:``, each a mapping (labels given as a list belong to a zip alone)."""
    check_section(axes, AXES_KEYS, where, "with 'grid:' and/or 'zip:' (key -> list of values)",
                  "Put the swept keys under 'grid:' or 'zip:'.")
    grid, zipped = axes.get("grid") or {}, axes.get("zip") or {}
    labels = axes.get("labels") or {}
    for section, value in (("grid", grid), ("zip", zipped)):
        if not isinstance(value, dict):
            raise SyncoError(f"{where}.{section} must be a mapping of config key -> list of values, got {value!r}.")
    if not isinstance(labels, (dict, list)):
        raise SyncoError(f"{where}.labels must be a mapping (axis key -> names), got {labels!r}.")
    if isinstance(labels, list):
        if grid or not zipped:
            raise SyncoError(f"{where}.labels is a list, which is only allowed for a zip alone; use a mapping "
                             "(grid key -> names, 'zip' -> names).")
        labels = {"zip": labels}
    names = axes.get("names") or {}
    if not isinstance(names, dict) or not all(isinstance(v, str) and v for v in names.values()):
        raise SyncoError(f"{where}.names must be a mapping (grid key or 'zip') -> dimension name, got {names!r}.")
    clash = sorted(set(grid) & set(zipped))
    if clash:
        raise SyncoError(f"{where}: key {clash[0]} is both in grid and in zip.")
    return grid, zipped, labels, names


def _grid_dimension(key: str, values: Any, labels: dict, name: str, where: str) -> Dimension:
    if not isinstance(values, list) or not values:
        raise SyncoError(f"{where}.grid.{key} must be a non-empty list of values, got {values!r} "
                         f"(a list-valued key takes a list of lists, e.g. [[4,4,4,4,4,4], [8,8,8,8,8,8]]).")
    for a, b in itertools.combinations(values, 2):
        if _same_value(a, b):
            raise SyncoError(f"{where}.grid.{key} lists the value {value_text(a)} twice.")
    lab = _labels_for(labels.get(key), len(values), f"{where}.labels.{key}")
    return _dimension(name, [key], [(v,) for v in values], lab)


def _zip_dimension(zipped: dict, labels: dict, names: dict, shorts: dict[str, str], where: str) -> Dimension:
    for key, values in zipped.items():
        if not isinstance(values, list) or not values:
            raise SyncoError(f"{where}.zip.{key} must be a non-empty list of values, got {values!r}.")
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) != 1:
        raise SyncoError(f"{where}.zip: the lists must have equal lengths, got "
                         f"{', '.join(f'{k}: {n}' for k, n in lengths.items())}.")
    keys = list(zipped)
    rows = [tuple(zipped[k][i] for k in keys) for i in range(len(zipped[keys[0]]))]
    for a, b in itertools.combinations(rows, 2):
        if all(_same_value(x, y) for x, y in zip(a, b)):
            raise SyncoError(f"{where}.zip lists the same row twice: {', '.join(map(value_text, a))}.")
    name = names.get("zip") or (shorts[keys[0]] if len(keys) == 1 else "+".join(shorts[k] for k in keys))
    lab = _labels_for(labels.get("zip"), len(rows), f"{where}.labels.zip")
    return _dimension(name, keys, rows, lab)


def _check_labels_and_names(dims: list[Dimension], grid: dict, zipped: dict, labels: dict, names: dict,
                            where: str) -> None:
    """Every label and name given belongs to a dimension, and no two dimensions share a name."""
    for section, mapping in (("labels", labels), ("names", names)):
        stray = sorted(set(mapping) - set(grid) - ({"zip"} if zipped else set()))
        if stray:
            raise SyncoError(f"{where}.{section} names {stray[0]!r}, which is not a grid key"
                             f"{' nor zip' if zipped else ''}.")
    dim_names = [d.name for d in dims]
    if len(set(dim_names)) != len(dim_names):
        raise SyncoError(f"{where}: two dimensions have the same name ({', '.join(dim_names)}); rename one with "
                         "axes.names.")
