"""One typed config for a pretraining run: defaults < preset YAML < ``key=value`` overrides.

Every field has a type; a preset or override naming an unknown key, or giving a value of the
wrong type, is a :class:`SyncoError` naming that key. The resolved config is saved with each run.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from .errors import SyncoError, key_error
from .hard_negatives import mochi_negatives


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs, stated once (solo-learn style): the engine, the model and the tools ask this, never
    the method's name."""

    name: str
    uses_queue: bool  # contrastive: InfoNCE against two queues of past keys (so the queue/global-batch rules apply)
    uses_synthetic: bool  # synthetic hard negatives inside the [warm-up, epochs - cool-down) window
    # The synthetic negatives' sizes from the queue size (a named configuration of SynCo's rules), instead of the
    # negatives section's n_hard and counts.
    synthetic_recipe: Optional[Callable[[int], dict]] = None


METHOD_SPECS = {m.name: m for m in (MethodSpec("synco", True, True), MethodSpec("moby", True, False),
                                    MethodSpec("mochi", True, True, mochi_negatives),
                                    MethodSpec("byol", False, False))}
METHODS = tuple(METHOD_SPECS)


def method_spec(cfg) -> MethodSpec:
    return METHOD_SPECS[cfg.method]


def negatives_kwargs(cfg) -> dict:
    """``SyntheticNegatives``' arguments of a config (the window is the trainer's, not theirs): the method's recipe
    (MoCHi) or the ``negatives`` section, with the hard set's rank window."""
    n, recipe = cfg.negatives, method_spec(cfg).synthetic_recipe
    sizes = recipe(cfg.contrast.queue_size) if recipe else dict(n_hard=n.n_hard, counts=tuple(n.counts),
                                                                alpha_max=n.alpha_max)
    return dict(beta_max=n.beta_max, sigma=n.sigma, delta=n.delta, eta=n.eta, skip_top=n.skip_top, **sizes)


def strategy_kwargs(cfg) -> dict:
    """The loss's hard-negative strategy (:class:`synco.losses.Strategy`'s arguments) from a config."""
    c, f = cfg.contrast, cfg.fnc
    return dict(reweight=c.reweight, beta=0.0 if c.reweight == "debiased" else c.beta, tau_plus=c.tau_plus,
                cancel=f.cancel, top_k=f.top_k, threshold=f.threshold, filter_hard_set=f.filter_hard_set)


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
    # Importance-reweighted denominator (synco.hard_negatives): hcl (Robinson et al.) or debiased (Chuang et al.,
    # HCL with beta 0), for every negative of the queue methods (queue and synthetic).
    reweight: str = "none"  # none | hcl | debiased
    beta: float = 0.4  # HCL's concentration on hard negatives (their best 1.0 at temperature 0.5 = 0.4 at 0.2)
    tau_plus: float = 0.1  # the class prior: the chance that a negative shares the query's class (~1 / classes)


@dataclass
class FalseNegativeConfig:
    """False-negative cancellation (Huynh et al.): queue entries most similar to the query's image are taken for
    false negatives (synco.hard_negatives.detect_false_negatives)."""

    cancel: str = "none"  # none | eliminate (dropped from the denominator) | attract (counted as positives)
    top_k: int = 10  # at most this many per query (0: no limit)
    threshold: Optional[float] = 0.7  # ... and only those above this cosine with the image's keys (null: none)
    filter_hard_set: bool = False  # synthetic negatives are made only from entries not taken for false negatives


@dataclass
class NegativesConfig:
    """Synthetic hard negatives (ignored unless the method uses them: see MethodSpec)."""

    n_hard: int = 256
    counts: list = field(default_factory=lambda: [128] * 6)
    alpha_max: float = 0.5
    beta_max: float = 1.5
    sigma: float = 0.01
    delta: float = 0.01
    eta: float = 0.01
    warmup_epochs: int = 30  # no synthetic negatives for epochs < warmup_epochs
    cooldown_epochs: int = 100  # ... nor for the last cooldown_epochs epochs
    skip_top: int = 0  # the hard set is the queue ranks [skip_top, skip_top + n_hard): the top ones are left out


@dataclass
class AugmentConfig:
    """The two BYOL views of Table 11 (SynCo-v2). A pair ``[a, b]`` gives view 1 (T) and view 2 (T')."""

    on: str = "workers"  # workers: per image in DataLoader workers | device: per batch on the training device
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: list = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # brightness, contrast, saturation, hue
    grayscale_p: float = 0.2
    blur_p: list = field(default_factory=lambda: [1.0, 0.1])
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: list = field(default_factory=lambda: [0.0, 0.2])


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | imagenet100 | folder
    root: Optional[str] = None
    class_list: Optional[str] = None  # file of class folder names, or "imagenet100"
    image_size: int = 224
    augment: AugmentConfig = field(default_factory=AugmentConfig)
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
    ckpt_every_minutes: float = 0.0  # also checkpoint every N minutes, checked at logged steps (0 = off)
    knn_at_end: bool = True
    knn_every: int = 0  # k-NN monitor every N epochs, logged to metrics.jsonl as learning curves (0 = off)
    threads: int = 0  # torch CPU threads (0 = torch default)
    model: ModelConfig = field(default_factory=ModelConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    fnc: FalseNegativeConfig = field(default_factory=FalseNegativeConfig)
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


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false. YAML 1.1 also reads on/off/yes/no as
    booleans, which would turn the key ``data.augment.on:`` into ``True``."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_yaml(text: str) -> Any:
    """Every YAML synco reads from users (presets, overrides, sweep specs): safe, with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)


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
        value = load_yaml(raw) if raw.strip() != "" else None
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
        data = load_yaml(text) or {}
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


_bad = key_error("config key")


def validate(cfg: Config) -> None:
    """Reject impossible configs early, naming the key. (World-size checks happen at launch.)"""
    bad = _bad  # a short name for the many checks below
    _check_finite(cfg)
    if cfg.method not in METHODS:
        bad("method", f"must be one of {', '.join(METHODS)}, got '{cfg.method}'.")
    if cfg.epochs < 1:
        bad("epochs", "must be >= 1.")
    if not 0 <= cfg.seed < 2**63:
        bad("seed", f"must be an integer in [0, 2^63), got {cfg.seed}.")
    if cfg.log_every < 1:
        bad("log_every", f"must be >= 1 (metrics are written every log_every steps), got {cfg.log_every}.")
    if cfg.ckpt_every_steps < 0:
        bad("ckpt_every_steps", "must be >= 0 (0 = checkpoint at epoch ends only).")
    if cfg.ckpt_every_minutes < 0:
        bad("ckpt_every_minutes", "must be >= 0 (0 = no timed checkpoints).")
    if cfg.threads < 0:
        bad("threads", "must be >= 0 (0 = torch's default).")
    if cfg.knn_every < 0:
        bad("knn_every", "must be >= 0 (0 turns the k-NN monitor off).")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad("device", "must be auto, cpu or cuda.")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        bad("precision", "must be auto, bf16 or fp32.")
    o = cfg.optim
    if o.batch_size < 2:
        bad("optim.batch_size", f"must be >= 2, got {o.batch_size}: the projector and predictor use BatchNorm, "
                                "which needs at least two images per batch.")
    if o.accum_steps < 1:
        bad("optim.accum_steps", "must be >= 1.")
    if o.base_lr <= 0:
        bad("optim.base_lr", "must be > 0.")
    if o.weight_decay < 0:
        bad("optim.weight_decay", "must be >= 0.")
    if o.min_lr < 0:
        bad("optim.min_lr", "must be >= 0.")
    if o.clip_grad is not None and o.clip_grad <= 0:
        bad("optim.clip_grad", "must be > 0, or null for no clipping.")
    if o.warmup_epochs < 0:
        bad("optim.warmup_epochs", f"must be in [0, epochs={cfg.epochs}].")
    if o.warmup_epochs > cfg.epochs:
        _note(f"optim.warmup_epochs={o.warmup_epochs:g} is more than epochs={cfg.epochs}: the warm-up is clamped "
              f"to {cfg.epochs} epochs (set optim.warmup_epochs=N to choose it).")
        o.warmup_epochs = float(cfg.epochs)
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                    for b in o.betas):
        bad("optim.betas", f"must be two numbers in [0, 1) (AdamW's beta1, beta2), got {o.betas}.")
    c = cfg.contrast
    if c.temperature <= 0:
        bad("contrast.temperature", "must be > 0.")
    if c.temperature > 100:
        bad("contrast.temperature", f"must be <= 100 (papers use 0.2), got {c.temperature}.")
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
    validate_negatives(cfg)
    validate_strategy(cfg)
    d = cfg.data
    if d.dataset not in ("digits", "imagenet100", "folder"):
        bad("data.dataset", f"must be digits, imagenet100 or folder, got '{d.dataset}'.")
    if d.dataset == "digits" and d.root:
        _note(f"data.root={d.root} is given without data.dataset: using data.dataset=folder (the built-in "
              "digits take no root).")
        d.dataset = "folder"
    if d.dataset != "digits" and not d.root:
        bad("data.root", f"dataset '{d.dataset}' needs data.root=/path/to/images.")
    validate_augment(d.augment)
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
    _match_image_size(cfg)
    k = cfg.knn
    if not k.k or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in k.k):
        bad("knn.k", f"must be a list of integers >= 1, got {k.k} (k=0 neighbours would report chance level).")
    if k.temperature <= 0:
        bad("knn.temperature", "must be > 0.")
    for key in ("max_train", "max_test"):
        if getattr(k, key) is not None and getattr(k, key) < 1:
            bad(f"knn.{key}", "must be >= 1 (or null for all).")


def validate_negatives(cfg: Config) -> None:
    """The synthetic negatives of a method that uses them (the generator checks its own arguments)."""
    spec, n, c = method_spec(cfg), cfg.negatives, cfg.contrast
    if not spec.uses_synthetic:
        return
    if n.warmup_epochs < 0 or n.cooldown_epochs < 0:
        _bad("negatives.warmup_epochs", "warm-up and cool-down must be >= 0.")
    if n.skip_top < 0:
        _bad("negatives.skip_top", f"must be >= 0, got {n.skip_top}.")
    kwargs = negatives_kwargs(cfg)
    if kwargs["n_hard"] + n.skip_top > c.queue_size:
        key = "negatives.skip_top" if n.skip_top else "negatives.n_hard"
        _bad(key, f"the hard set, queue ranks [{n.skip_top}, {n.skip_top + kwargs['n_hard']}), does not fit the "
                  f"queue (contrast.queue_size={c.queue_size}).")
    if spec.synthetic_recipe is not None:
        _note(f"method={cfg.method}: the hard set and synthetic counts come from the queue size (n_hard="
              f"{kwargs['n_hard']}, counts={list(kwargs['counts'])}); negatives.n_hard and negatives.counts are "
              "not used.")
    if n.warmup_epochs >= cfg.epochs - n.cooldown_epochs:
        _note(f"no synthetic negatives in this run: the window [negatives.warmup_epochs={n.warmup_epochs}, "
              f"epochs - negatives.cooldown_epochs={cfg.epochs - n.cooldown_epochs}) is empty, so "
              f"method={cfg.method} trains exactly as moby. Lower the warm-up/cool-down to use them.")
    from .negatives import SyntheticNegatives

    try:
        SyntheticNegatives(**kwargs)
    except SyncoError as e:
        raise SyncoError(f"config section 'negatives': {e}") from None


def validate_strategy(cfg: Config) -> None:
    """The hard-negative strategy of the loss: reweighting and false-negative cancellation (queue methods)."""
    c, f, spec = cfg.contrast, cfg.fnc, method_spec(cfg)
    if c.reweight not in ("none", "hcl", "debiased"):
        _bad("contrast.reweight", f"must be none, hcl or debiased, got '{c.reweight}'.")
    if c.beta < 0:
        _bad("contrast.beta", f"must be >= 0, got {c.beta}.")
    if not 0.0 <= c.tau_plus < 1.0:
        _bad("contrast.tau_plus", f"must be in [0, 1) (a class prior), got {c.tau_plus}.")
    if f.cancel not in ("none", "eliminate", "attract"):
        _bad("fnc.cancel", f"must be none, eliminate or attract, got '{f.cancel}'.")
    if f.top_k < 0:
        _bad("fnc.top_k", f"must be >= 0 (0: no limit), got {f.top_k}.")
    if f.threshold is not None and not -1.0 <= f.threshold <= 1.0:
        _bad("fnc.threshold", f"must be a cosine in [-1, 1], or null for none, got {f.threshold}.")
    if f.top_k == 0 and f.threshold is None and (f.cancel != "none" or f.filter_hard_set):
        _bad("fnc.top_k", "with fnc.threshold null as well, every queue entry would be a false negative.")
    used = c.reweight != "none" or f.cancel != "none" or f.filter_hard_set
    if used and not spec.uses_queue:
        _bad("method", f"method={cfg.method} has no negatives: contrast.reweight, fnc.cancel and "
                       "fnc.filter_hard_set apply to moby, synco and mochi.")
    if f.filter_hard_set and not spec.uses_synthetic:
        _bad("fnc.filter_hard_set", f"method={cfg.method} makes no synthetic negatives.")
    if c.reweight != "none" and f.cancel == "attract":
        _bad("contrast.reweight", "HCL's reweighting has one positive; it combines with fnc.cancel=eliminate, not "
                                  "attract.")


def _note(message: str) -> None:
    """A config value was adjusted or has a consequence worth knowing: say it (stderr, via logging)."""
    import logging

    logging.getLogger("synco.config").warning(message)


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float (and every number in a list) of the config is finite: NaN and inf pass comparisons
    like ``x <= 0`` unnoticed and would only surface as a diverged run."""
    import math

    for f in fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            _check_finite(value, key + ".")
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise SyncoError(f"config key '{key}': must be a finite number, got {value!r}.")


# timm modules whose models are built for one input size (``img_size``): ViT, DeiT, Swin and relatives.
_FIXED_SIZE_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos",
                       "vision_transformer_sam", "deit", "swin_transformer", "swin_transformer_v2",
                       "swin_transformer_v2_cr", "beit", "eva", "cait", "xcit", "pit", "tnt", "crossvit", "volo")


def _match_image_size(cfg: Config) -> None:
    """The backbone must be built for ``data.image_size``. Without ``img_size`` in model.backbone_kwargs the
    backbone follows data.image_size; an explicit, different img_size is an error naming the fix."""
    size, kwargs = cfg.data.image_size, cfg.model.backbone_kwargs
    if "img_size" in kwargs:
        built = kwargs["img_size"]
        built = built[-1] if isinstance(built, (list, tuple)) and built else built
        if built != size:
            fixed = {**kwargs, "img_size": size}
            text = "{" + ", ".join(f"{k}: {v}" for k, v in fixed.items()) + "}"
            raise SyncoError(
                f"config key 'data.image_size': {size} px images, but the backbone is built for {built} px "
                f"(model.backbone_kwargs.img_size={kwargs['img_size']}). Set both, e.g. data.image_size={size} "
                f"'model.backbone_kwargs={text}', or keep data.image_size={built}.")
        return
    try:
        import timm.models as tm

        default = tm.get_pretrained_cfg_value(cfg.model.backbone, "input_size")
        fixed_size = tm.is_model_in_modules(cfg.model.backbone, list(_FIXED_SIZE_MODULES))
    except Exception:  # noqa: BLE001 - unknown name: create_backbone reports it
        return
    if fixed_size and default and default[-1] != size:
        cfg.model.backbone_kwargs = {**kwargs, "img_size": size}
        _note(f"data.image_size={size}: building {cfg.model.backbone} for {size} px inputs "
              f"(model.backbone_kwargs.img_size={size}; its default is {default[-1]}).")


def validate_augment(a: AugmentConfig) -> None:
    if a.on not in ("workers", "device"):
        _bad("data.augment.on", f"must be workers or device, got '{a.on}'.")
    for key in ("crop_scale", "crop_ratio", "jitter", "blur_sigma", "blur_p", "solarize_p"):
        v = getattr(a, key)  # untyped lists: check the elements are numbers before comparing them
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
            _bad(f"data.augment.{key}", f"must be a list of numbers, got {v!r}.")
    if len(a.crop_scale) != 2 or not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
        _bad("data.augment.crop_scale", "must be [min, max] with 0 < min <= max <= 1.")
    if len(a.crop_ratio) != 2 or not 0 < a.crop_ratio[0] <= a.crop_ratio[1]:
        _bad("data.augment.crop_ratio", "must be [min, max] with 0 < min <= max.")
    if len(a.jitter) != 4 or any(not 0 <= v for v in a.jitter) or a.jitter[3] > 0.5:
        _bad("data.augment.jitter", "must be [brightness, contrast, saturation, hue], all >= 0 and hue <= 0.5.")
    if len(a.blur_sigma) != 2 or not 0 < a.blur_sigma[0] <= a.blur_sigma[1]:
        _bad("data.augment.blur_sigma", "must be [min, max] with 0 < min <= max.")
    for key in ("flip_p", "jitter_p", "grayscale_p"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            _bad(f"data.augment.{key}", "must be a probability in [0, 1].")
    for key in ("blur_p", "solarize_p"):
        v = getattr(a, key)
        if len(v) != 2 or not all(0.0 <= p <= 1.0 for p in v):
            _bad(f"data.augment.{key}", "must be two probabilities [view 1, view 2], each in [0, 1].")


def synthetic_window(cfg: Config) -> tuple[int, int]:
    """Epochs [start, end) during which synthetic negatives are used (empty unless the method uses them)."""
    if not method_spec(cfg).uses_synthetic:
        return (0, 0)
    return (cfg.negatives.warmup_epochs, cfg.epochs - cfg.negatives.cooldown_epochs)

