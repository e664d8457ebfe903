"""Typed options for every command: ``key=value`` overrides onto a dataclass, and the one check of their values.

Pure (the standard library and yaml only), so every layer may use it. Two halves:

* **The override engine.** ``apply_overrides(obj, ["optim.lr=1e-3"])`` parses each value as YAML (with YAML 1.2's
  booleans), coerces it to the field's annotation and sets it. ``list[float]`` coerces every element, so
  ``lrs=[1e-1]`` (a string to YAML 1.1, which wants a dot) is the float 0.1. Errors name the option's owner: the
  class attribute ``OWNER`` ("config key" for the pretraining config, "synth-data train option", ...), else
  "option".
* **Declarative bounds.** ``lr: float = opt(1e-3, gt=0)`` stores a :class:`Rule` in the field's metadata, and
  :func:`check_options` checks every field of a dataclass (nested sections too): floats finite everywhere, then
  each rule's bounds, choices and list length. Rules between fields (``warmup_epochs <= epochs``) stay
  with their owners (``config.validate``, ``eval.probe.check_recipe``, ...), which call :func:`check_options`
  first. Output folders are checked by :func:`synco.io.check_output_dir`, which needs the file system's answer.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from fractions import Fraction
from typing import Any, Optional, Union

import yaml

from .errors import SyncoError

DEFAULT_OWNER = "option"
# Caps every command shares, on values that would otherwise end in a crash or an allocator error.
MAX_THREADS = 1024  # more than any CPU's cores; OpenMP fails to create 100,000 threads and the process crashes
MAX_IMAGE_SIZE = 4096  # 18x the papers' 224 px: 65,536 tokens per image for a ViT with 16-px patches
SEED_RANGE = dict(ge=0, lt=2**63)  # every seed of synco (torch's generators take 64 bits)
# A number YAML 1.1 leaves as a string: it reads 1e-3 and 1.5e3 only with a dot and a signed exponent.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_NOUNS = {float: "numbers", int: "integers", str: "strings", bool: "true/false values"}


def owner_of(obj: Any) -> str:
    """What an error calls this object's keys: ``config key`` for the pretraining config, ``option`` by default."""
    return getattr(type(obj), "OWNER", DEFAULT_OWNER)


# ---------------------------------------------------------------------------------------------
# Typed assignment


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _number_text(value: Any) -> Optional[str]:
    """``value`` when it is a numeric string (``"1e-1"``), else None: 'nan' and 'inf' are not numbers here."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return value.strip()
    return None


def _exact_int(text: str) -> Optional[int]:
    """The integer a numeric string names exactly (``"1e3"`` -> 1000), or None (``"1.5"``, or an exponent so
    large that the number would take seconds to build; no option wants one)."""
    exponent = text.lower().partition("e")[2]
    if exponent and abs(int(exponent)) > 40:
        return None
    exact = Fraction(text)
    return int(exact) if exact.denominator == 1 else None


def _scalar(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, coerced) for a scalar type: ints are accepted for floats, integral numeric strings for ints."""
    if tp is float:
        text = _number_text(value)
        if text is not None:
            return True, float(text)  # "1e999" is inf, which check_options refuses
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        text = _number_text(value)
        exact = _exact_int(text) if text is not None else None
        if exact is not None:
            return True, exact
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return True, value  # Any and unparametrised containers: taken as given


def _coerce(owner: str, key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (and converted where the conversion is exact)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(owner, key, value, arg)
            except SyncoError as e:
                errors.append(str(e))
        raise SyncoError(errors[0] if errors else f"{owner} '{key}': bad value {value!r}")
    if tp is list or origin is list:
        return _coerce_list(owner, key, value, (typing.get_args(tp) or (Any,))[0])
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise SyncoError(f"{owner} '{key}' expects a mapping like {{a: 1}}, got {value!r}.")
        return value
    if tp not in (float, int, bool, str):
        raise SyncoError(f"{owner} '{key}' has unsupported type {_type_name(tp)}")
    ok, coerced = _scalar(value, tp)
    if not ok:
        what = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[tp]
        raise SyncoError(f"{owner} '{key}' expects {what}, got {value!r}.")
    return coerced


def _coerce_list(owner: str, key: str, value: Any, element: Any) -> list:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise SyncoError(f"{owner} '{key}' expects a list like [1, 2], got {value!r}.")
    if element is Any:
        return value
    out = []
    for v in value:
        ok, coerced = _scalar(v, element)
        if not ok:
            raise SyncoError(f"{owner} '{key}': must be a list of {_NOUNS.get(element, _type_name(element))}, "
                             f"got {value!r}.")
        out.append(coerced)
    return out


def set_option(obj: Any, dotted: str, value: Any, owner: Optional[str] = None) -> None:
    """``obj.a.b = value`` for ``dotted`` ``"a.b"``, typed by the dataclass annotations; a mapping sets a section's
    fields one by one."""
    owner = owner or owner_of(obj)
    parts = dotted.split(".")
    node = obj
    for i, part in enumerate(parts):
        names = {f.name for f in fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise SyncoError(f"unknown {owner} '{dotted}': '{part}' is not a field of {where} "
                             f"(valid: {', '.join(sorted(names))}).")
        if i < len(parts) - 1:
            node = getattr(node, part)
            if not is_dataclass(node):
                raise SyncoError(f"{owner} '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section.")
            continue
        if is_dataclass(getattr(node, part)):
            if not isinstance(value, dict):
                raise SyncoError(f"{owner} '{dotted}' is a section; give a mapping or set its fields.")
            for k, v in value.items():
                set_option(obj, f"{dotted}.{k}", v, owner)
        else:
            setattr(node, part, _coerce(owner, dotted, value, typing.get_type_hints(type(node))[part]))


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice. YAML requires unique keys; PyYAML keeps the last value silently, which
    drops the first (``seeds: 1`` then ``seeds: 3`` would run 3 seeds without a word)."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans (only true/false: YAML 1.1 also reads on/off/yes/no as
    booleans, which would turn the key ``data.augment.on:`` into ``True``) and unique mapping keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """A DuplicateKeyError naming the key and both lines; keys brought in by a merge (``<<: *base``) may be
    given again (that is what a merge is for), so only the mapping's own keys are compared."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise DuplicateKeyError(f"the key '{key}' is given twice in one mapping (line {seen[key]} and line "
                                        f"{line}); YAML keeps only the last value, which would silently drop the "
                                        "other. Give it once.")
            seen[key] = line
        except TypeError:  # an unhashable key (a list): PyYAML's own error says so
            continue


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_yaml(text: str) -> Any:
    """Every YAML synco reads (presets, config files, overrides, sweep specs, a run's config.yaml): safe, with YAML
    1.2 booleans, a key given twice in one mapping refused (DuplicateKeyError, a yaml.YAMLError whose text names the
    key and both lines: callers put the file's name in front)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def apply_dict(obj: Any, data: dict, prefix: str = "", owner: Optional[str] = None) -> Any:
    """Set the options of a mapping (a config file, a spec section); one option set twice with different values
    (``model.proj_dim: 32`` and ``model: {proj_dim: 16}``) is refused, as on the command line."""
    owner = owner or owner_of(obj)
    leaves: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        _claim_leaves(leaves, f"{prefix}{key}", value, f"{prefix}{key}: {value!r}", owner)
    for key, value in data.items():
        set_option(obj, f"{prefix}{key}", value, owner)
    return obj


def option_leaves(key: str, value: Any) -> dict[str, Any]:
    """The dotted options an assignment sets: ``model={proj_dim: 16}`` sets ``model.proj_dim``."""
    if isinstance(value, dict) and value:
        return {path: v for k, sub in value.items() for path, v in option_leaves(f"{key}.{k}", sub).items()}
    return {key: value}


def _claim_leaves(leaves: dict, key: str, value: Any, text: str, owner: str) -> None:
    """Record the options ``key = value`` sets; one already set to another value is an error naming both."""
    for path, v in option_leaves(key, value).items():
        if path in leaves and not _same_value(leaves[path][1], v):
            raise SyncoError(f"{owner} '{path}' is given twice with different values ('{leaves[path][0]}' and "
                             f"'{text}'); give it once.")
        leaves.setdefault(path, (text, v))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SyncoError(f"override '{text}' is not of the form key=value (e.g. optim.batch_size=64).")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() != "" else None
    except DuplicateKeyError as e:
        raise SyncoError(f"override '{text}': {e}") from None
    except yaml.YAMLError as e:
        raise SyncoError(f"override '{text}': cannot parse value ({e.__class__.__name__}).") from None
    return key, value


def _parsed_overrides(overrides: list[str], owner: str) -> dict[str, tuple[str, Any]]:
    """key -> (text, value) of one list of ``key=value`` strings. The same key twice with different values is an
    error: taking the last one silently (``k=[1,20] ... k=[5]``) runs something else than half the command says.
    The same key twice with the same value is harmless and kept once."""
    parsed: dict[str, tuple[str, Any]] = {}
    leaves: dict[str, tuple[str, Any]] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in parsed and not _same_value(parsed[key][1], value):
            raise SyncoError(f"{owner} '{key}' is given twice with different values ('{parsed[key][0]}' and "
                             f"'{text}'); give it once.")
        _claim_leaves(leaves, key, value, text, owner)  # also a section's mapping against a dotted key
        parsed.setdefault(key, (text, value))
    return parsed


def _same_value(a: Any, b: Any) -> bool:
    """Equal as parsed values, and of the same kind (``1`` and ``true`` compare equal in Python, not here). A number
    and a string that reads as that number are the same (YAML reads ``1e-1`` as a string; the option layer as 0.1)."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def as_number(x: Any) -> Any:
        try:
            return float(x) if isinstance(x, str) else x
        except ValueError:
            return x

    if number(a) != number(b):
        a, b = as_number(a), as_number(b)
    return (type(a) is type(b) or (number(a) and number(b))) and a == b


def layer_overrides(*layers: list[str], owner: str = DEFAULT_OWNER) -> list[str]:
    """Lists of ``key=value`` strings merged where a later list is meant to replace keys of an earlier one (a sweep:
    the spec's overrides, then the command line's, then the point's): one string per key, the last layer's. Each
    list is checked by itself (a key twice in one list with different values is still an error)."""
    merged: dict[str, str] = {}
    for layer in layers:
        for key, (text, _) in _parsed_overrides(list(layer), owner).items():
            merged.pop(key, None)  # keep the order in which the keys are finally set
            merged[key] = text
    return list(merged.values())


def apply_overrides(obj: Any, overrides: list[str], owner: Optional[str] = None) -> Any:
    """Apply ``key=value`` strings (values parsed as YAML) to any dataclass of options; a key given twice with
    different values is refused (see :func:`layer_overrides` for lists meant to replace each other's keys)."""
    owner = owner or owner_of(obj)
    for key, (_, value) in _parsed_overrides(list(overrides), owner).items():
        set_option(obj, key, value, owner)
    return obj


# ---------------------------------------------------------------------------------------------
# Declarative bounds


@dataclass(frozen=True)
class Rule:
    """What one field's value must be. Numeric bounds and choices apply to a list's every element; ``length`` and
    ``nonempty`` to the list itself. ``why`` ends the error: the reason for the bound, or what null means."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple] = None
    length: Optional[int] = None
    nonempty: bool = False
    why: str = ""

    def range_text(self) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]

    def in_range(self, v: Any) -> bool:
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))

    def has_bounds(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))


def _num(x: float) -> str:
    """Bounds as people write them: 2^63 rather than 9223372036854775808."""
    if isinstance(x, int) and x >= 2**20 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def opt(default: Any = MISSING, *, factory: Any = MISSING, **rule: Any):
    """A dataclass field with a :class:`Rule`: ``lr: float = opt(1e-3, gt=0)``, ``lrs: list[float] =
    opt(factory=lambda: [0.1], gt=0, nonempty=True)``."""
    return field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


def _non_finite(value: Any) -> bool:
    """Whether a NaN or an infinity hides in ``value`` (a number, or a list or mapping of them)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def check_options(obj: Any, owner: Optional[str] = None, prefix: str = "") -> None:
    """Check every field of the dataclass ``obj`` (recursively): floats are finite (NaN and inf pass comparisons
    like ``x <= 0`` unnoticed and surface later as a diverged run or a NaN result), then each field's rule."""
    owner = owner or owner_of(obj)
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            check_options(value, owner, key + ".")
            continue
        if _non_finite(value):
            raise SyncoError(f"{owner} '{key}': must be a finite number, got {value!r}.")
        rule = f.metadata.get("rule")
        if rule is not None and value is not None:
            problem = _problem(rule, value)
            if problem:
                why = f" ({rule.why})" if rule.why else ""
                raise SyncoError(f"{owner} '{key}': {problem}{why}.")


def _problem(rule: Rule, value: Any) -> Optional[str]:
    """What is wrong with ``value`` under ``rule`` (the middle of the error), or None."""
    if isinstance(value, (list, tuple)):
        if rule.nonempty and not value:
            return "must not be an empty list"
        if rule.length is not None and len(value) != rule.length:
            return f"must be a list of {rule.length} values, got {list(value)!r}"
        bad = [v for v in value if v is not None and _scalar_problem(rule, v)]
        return f"every value {_scalar_problem(rule, bad[0])}, got {list(value)!r}" if bad else None
    problem = _scalar_problem(rule, value)
    return f"{problem}, got {value!r}" if problem else None


def _scalar_problem(rule: Rule, v: Any) -> Optional[str]:
    if rule.choices is not None and v not in rule.choices:
        return f"must be one of {', '.join(map(str, rule.choices))}"
    if rule.has_bounds() and isinstance(v, (int, float)) and not rule.in_range(v):
        return f"must be {rule.range_text()}"
    return None
