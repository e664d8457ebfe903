"""One typed config for a pretraining run: defaults < preset YAML < ``key=value`` overrides.

Every field has a type; a preset or override naming an unknown key, or giving a value of the
wrong type, is a :class:`SyncoError` naming that key. The resolved config is saved with each run.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import SyncoError

METHODS = ("synco", "moby", "byol")


@dataclass
class ModelConfig:
    backbone: str = "deit_small_patch16_224"
    backbone_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (e.g. img_size)
    drop_path_online: float = 0.05
    drop_path_target: float = 0.0
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    fixed_patch_embed: bool = False  # MoCo-v3 trick: frozen random patch projection
    bn_before_mlp: bool = False  # MoCo-v3 trick: BatchNorm instead of LayerNorm before each MLP


@dataclass
class ContrastConfig:
    temperature: float = 0.2
    queue_size: int = 4096
    momentum_start: float = 0.99


@dataclass
class NegativesConfig:
    """Synthetic hard negatives (ignored unless method == 'synco')."""

    n_hard: int = 256
    counts: list = field(default_factory=lambda: [128] * 6)
    alpha_max: float = 0.5
    beta_max: float = 1.5
    sigma: float = 0.01
    delta: float = 0.01
    eta: float = 0.01
    warmup_epochs: int = 30  # no synthetic negatives for epochs < warmup_epochs
    cooldown_epochs: int = 100  # ... nor for the last cooldown_epochs epochs


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | imagenet100 | folder
    root: Optional[str] = None
    class_list: Optional[str] = None  # file of class folder names, or "imagenet100"
    image_size: int = 224
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    num_workers: int = 8
    max_images: Optional[int] = None  # a fixed random subset of the training set (quick runs, tests)
    synthetic_root: Optional[str] = None  # Syn2Co: ImageFolder of generated images
    synthetic_ratio: float = 0.0  # fraction of each epoch's samples drawn from synthetic_root
    synthetic_mode: str = "replace"  # replace: epoch size = real size; add: real + synthetic


@dataclass
class OptimConfig:
    batch_size: int = 128  # per process
    accum_steps: int = 1
    base_lr: float = 1.5e-4  # per 512 images of effective batch
    weight_decay: float = 0.1
    warmup_epochs: float = 40
    min_lr: float = 0.0
    clip_grad: Optional[float] = 5.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class KnnConfig:
    k: list = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    max_train: Optional[int] = None  # cap the feature bank of the end-of-run k-NN (None = all)
    max_test: Optional[int] = None


@dataclass
class Config:
    method: str = "synco"
    epochs: int = 300
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    deterministic: bool = False
    compile: bool = False
    resume: bool = True  # continue automatically when the output dir holds a checkpoint
    log_every: int = 10
    ckpt_every_steps: int = 0  # also checkpoint every N optimizer steps (0 = only at epoch ends)
    knn_at_end: bool = True
    threads: int = 0  # torch CPU threads (0 = torch default)
    model: ModelConfig = field(default_factory=ModelConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Typed assignment


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except SyncoError as e:
                errors.append(str(e))
        raise SyncoError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SyncoError(f"config key '{key}' expects a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SyncoError(f"config key '{key}' expects an integer, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SyncoError(f"config key '{key}' expects true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SyncoError(f"config key '{key}' expects a string, got {value!r}.")
        return value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise SyncoError(f"config key '{key}' expects a list like [1, 2], got {value!r}.")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise SyncoError(f"config key '{key}' expects a mapping like {{a: 1}}, got {value!r}.")
        return value
    raise SyncoError(f"config key '{key}' has unsupported type {_type_name(tp)}")


def _set(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise SyncoError(
                f"unknown config key '{dotted}': '{part}' is not a field of {where} "
                f"(valid: {', '.join(sorted(names))})."
            )
        hints = typing.get_type_hints(type(node))
        if i == len(parts) - 1:
            if is_dataclass(getattr(node, part)):
                if not isinstance(value, dict):
                    raise SyncoError(f"config key '{dotted}' is a section; give a mapping or set its fields.")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v)
            else:
                setattr(node, part, _coerce(dotted, value, hints[part]))
        else:
            node = getattr(node, part)
            if not is_dataclass(node):
                raise SyncoError(f"config key '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section.")


def apply_dict(cfg: Any, data: dict, prefix: str = "") -> Any:
    for key, value in data.items():
        _set(cfg, f"{prefix}{key}", value)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SyncoError(f"override '{text}' is not of the form key=value (e.g. optim.batch_size=64).")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise SyncoError(f"override '{text}': cannot parse value ({e.__class__.__name__}).") from None
    return key, value


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``key=value`` strings (values parsed as YAML) to any dataclass config."""
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    return cfg


# ---------------------------------------------------------------------------------------------
# Presets


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("synco.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path_or_name: str) -> tuple[dict, str]:
    path = Path(path_or_name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SyncoError(f"config file '{path}' does not exist.")
        text, origin = path.read_text(), str(path)
    else:
        res = resources.files("synco.presets") / f"{path_or_name}.yaml"
        if not res.is_file():
            raise SyncoError(
                f"unknown preset '{path_or_name}'. Available presets: {', '.join(preset_names())}; "
                "or give the path of a YAML file."
            )
        text, origin = res.read_text(), f"preset {path_or_name}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SyncoError(f"{origin} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SyncoError(f"{origin} must be a mapping of config keys.")
    return data, origin


def load_config(preset: Optional[str] = "cpu-demo", overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the preset (a shipped name or a YAML path; ``base:`` chains presets), then overrides."""
    cfg = Config()
    chain: list[dict] = []
    name = preset
    while name:
        data, origin = _read_yaml(name)
        chain.append(data)
        name = data.pop("base", None)
        if len(chain) > 10:
            raise SyncoError(f"{origin}: preset 'base' chain is too deep (a cycle?).")
    for data in reversed(chain):
        apply_dict(cfg, data)
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def validate(cfg: Config) -> None:
    """Reject impossible configs early, naming the key. (World-size checks happen at launch.)"""
    def bad(key: str, msg: str) -> None:
        raise SyncoError(f"config key '{key}': {msg}")

    if cfg.method not in METHODS:
        bad("method", f"must be one of {', '.join(METHODS)}, got '{cfg.method}'.")
    if cfg.epochs < 1:
        bad("epochs", "must be >= 1.")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad("device", "must be auto, cpu or cuda.")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        bad("precision", "must be auto, bf16 or fp32.")
    o = cfg.optim
    if o.batch_size < 1:
        bad("optim.batch_size", "must be >= 1.")
    if o.accum_steps < 1:
        bad("optim.accum_steps", "must be >= 1.")
    if o.base_lr <= 0:
        bad("optim.base_lr", "must be > 0.")
    if o.warmup_epochs < 0 or o.warmup_epochs > cfg.epochs:
        bad("optim.warmup_epochs", f"must be in [0, epochs={cfg.epochs}].")
    if len(o.betas) != 2:
        bad("optim.betas", "must be a list of two numbers.")
    c = cfg.contrast
    if c.temperature <= 0:
        bad("contrast.temperature", "must be > 0.")
    if c.queue_size < 1:
        bad("contrast.queue_size", "must be >= 1.")
    if not 0.0 <= c.momentum_start <= 1.0:
        bad("contrast.momentum_start", "must be in [0, 1].")
    m = cfg.model
    for key in ("drop_path_online", "drop_path_target"):
        if not 0.0 <= getattr(m, key) < 1.0:
            bad(f"model.{key}", "must be in [0, 1).")
    for key in ("proj_hidden", "proj_dim", "pred_hidden"):
        if getattr(m, key) < 1:
            bad(f"model.{key}", "must be >= 1.")
    n = cfg.negatives
    if cfg.method == "synco":
        if n.n_hard > c.queue_size:
            bad("negatives.n_hard", f"{n.n_hard} is larger than the queue (contrast.queue_size={c.queue_size}).")
        if n.warmup_epochs < 0 or n.cooldown_epochs < 0:
            bad("negatives.warmup_epochs", "warm-up and cool-down must be >= 0.")
        # The generator validates the rest (counts, alpha_max, ...) with the same key names.
        from .negatives import SyntheticNegatives

        try:
            SyntheticNegatives(n_hard=n.n_hard, counts=tuple(n.counts), alpha_max=n.alpha_max,
                               beta_max=n.beta_max, sigma=n.sigma, delta=n.delta, eta=n.eta)
        except SyncoError as e:
            raise SyncoError(f"config section 'negatives': {e}") from None
    d = cfg.data
    if d.dataset not in ("digits", "imagenet100", "folder"):
        bad("data.dataset", f"must be digits, imagenet100 or folder, got '{d.dataset}'.")
    if d.dataset != "digits" and not d.root:
        bad("data.root", f"dataset '{d.dataset}' needs data.root=/path/to/images.")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        bad("data.crop_scale", "must be [min, max] with 0 < min <= max <= 1.")
    if not 0.0 <= d.synthetic_ratio <= 1.0:
        bad("data.synthetic_ratio", "must be in [0, 1].")
    if d.synthetic_ratio > 0 and not d.synthetic_root:
        bad("data.synthetic_root", "data.synthetic_ratio > 0 needs data.synthetic_root=DIR.")
    if d.synthetic_mode not in ("replace", "add"):
        bad("data.synthetic_mode", "must be replace or add.")
    if d.image_size < 8:
        bad("data.image_size", "must be >= 8.")
    if d.max_images is not None and d.max_images < 1:
        bad("data.max_images", "must be >= 1 (or null for all images).")
    if d.num_workers < 0:
        bad("data.num_workers", "must be >= 0.")


def synthetic_window(cfg: Config) -> tuple[int, int]:
    """Epochs [start, end) during which synthetic negatives are used (empty unless method == synco)."""
    if cfg.method != "synco":
        return (0, 0)
    return (cfg.negatives.warmup_epochs, cfg.epochs - cfg.negatives.cooldown_epochs)

