"""One typed config for a pretraining run: defaults < preset YAML < ``key=value`` overrides.

Every field has a type; a preset or override naming an unknown key, or giving a value of the
wrong type, is a :class:`SyncoError` naming that key. The resolved config is saved with each run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from .errors import SyncoError, key_error
from .methods import METHODS, method_spec, negatives_kwargs

# The override engine and the bounds check live in synco.options (every command's options use them); these names
# are the config's public API too.
from .options import (  # noqa: F401
    MAX_IMAGE_SIZE,
    MAX_THREADS,
    SEED_RANGE,
    apply_dict,
    apply_overrides,
    check_options,
    load_yaml,
    opt,
    parse_override,
)

# Caps on sizes that no run needs and that would otherwise end in an allocator error, with the reason (the caps
# every command shares are in synco.options).
MAX_WIDTH = 65536  # 16x the papers' 4096-wide heads
MAX_QUEUE = 2**20  # 16x MoCo's largest queue (65,536)
_WIDTH = dict(ge=1, le=MAX_WIDTH, why=f"at most {MAX_WIDTH}, 16x the papers' 4096")


@dataclass
class ModelConfig:
    backbone: str = "deit_small_patch16_224"
    backbone_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (e.g. img_size)
    drop_path_online: float = opt(0.05, ge=0, lt=1)
    drop_path_target: float = opt(0.0, ge=0, lt=1)
    proj_hidden: int = opt(4096, **_WIDTH)
    proj_dim: int = opt(256, **_WIDTH)
    pred_hidden: int = opt(4096, **_WIDTH)
    fixed_patch_embed: bool = False  # MoCo-v3 trick: frozen random patch projection
    bn_before_mlp: bool = False  # MoCo-v3 trick: BatchNorm instead of LayerNorm before each MLP


@dataclass
class ContrastConfig:
    temperature: float = opt(0.2, gt=0, le=100, why="papers use 0.2")
    queue_size: int = opt(4096, ge=1, le=MAX_QUEUE, why=f"at most {MAX_QUEUE:,}, 16x MoCo's largest queue")
    momentum_start: float = opt(0.99, ge=0, le=1)
    # Importance-reweighted denominator (synco.hard_negatives): hcl (Robinson et al.) or debiased (Chuang et al.,
    # HCL with beta 0), for every negative of the queue methods (queue and synthetic).
    reweight: str = opt("none", choices=("none", "hcl", "debiased"))
    # HCL's concentration on hard negatives (their best 1.0 at temperature 0.5 = 0.4 at 0.2)
    beta: float = opt(0.4, ge=0)
    tau_plus: float = opt(0.1, ge=0, lt=1, why="a class prior")  # the chance that a negative shares the query's class


@dataclass
class FalseNegativeConfig:
    """False-negative cancellation (Huynh et al.): queue entries most similar to the query's image are taken for
    false negatives (synco.hard_negatives.detect_false_negatives)."""

    # none | eliminate (dropped from the denominator) | attract (counted as positives)
    cancel: str = opt("none", choices=("none", "eliminate", "attract"))
    top_k: int = opt(10, ge=0, why="0: no limit")  # at most this many per query
    # ... and only those above this cosine with the image's keys (null: none)
    threshold: Optional[float] = opt(0.7, ge=-1, le=1, why="a cosine, or null for none")
    filter_hard_set: bool = False  # synthetic negatives are made only from entries not taken for false negatives


@dataclass
class NegativesConfig:
    """Synthetic hard negatives (ignored unless the method uses them: see MethodSpec). ``SyntheticNegatives``
    checks its own arguments (n_hard, counts, alpha_max, ...)."""

    n_hard: int = 256
    counts: list[int] = field(default_factory=lambda: [128] * 6)
    alpha_max: float = 0.5
    beta_max: float = 1.5
    sigma: float = 0.01
    delta: float = 0.01
    eta: float = 0.01
    warmup_epochs: int = opt(30, ge=0)  # no synthetic negatives for epochs < warmup_epochs
    cooldown_epochs: int = opt(100, ge=0)  # ... nor for the last cooldown_epochs epochs
    # the hard set is the queue ranks [skip_top, skip_top + n_hard): the top ones are left out
    skip_top: int = opt(0, ge=0)


_PAIR_P = dict(length=2, ge=0, le=1, why="two probabilities [view 1, view 2]")


@dataclass
class AugmentConfig:
    """The two BYOL views of Table 11 (SynCo-v2). A pair ``[a, b]`` gives view 1 (T) and view 2 (T')."""

    # workers: per image in DataLoader workers | device: per batch on the training device
    on: str = opt("workers", choices=("workers", "device"))
    crop_scale: list[float] = opt(factory=lambda: [0.08, 1.0], length=2, gt=0, le=1, why="[min, max]")
    crop_ratio: list[float] = opt(factory=lambda: [3 / 4, 4 / 3], length=2, gt=0, why="[min, max]")
    flip_p: float = opt(0.5, ge=0, le=1)
    jitter_p: float = opt(0.8, ge=0, le=1)
    # brightness, contrast, saturation, hue
    jitter: list[float] = opt(factory=lambda: [0.4, 0.4, 0.2, 0.1], length=4, ge=0,
                              why="[brightness, contrast, saturation, hue]")
    grayscale_p: float = opt(0.2, ge=0, le=1)
    blur_p: list[float] = opt(factory=lambda: [1.0, 0.1], **_PAIR_P)
    blur_sigma: list[float] = opt(factory=lambda: [0.1, 2.0], length=2, gt=0, why="[min, max]")
    solarize_p: list[float] = opt(factory=lambda: [0.0, 0.2], **_PAIR_P)


@dataclass
class DataConfig:
    dataset: str = opt("digits", choices=("digits", "imagenet100", "folder"))
    root: Optional[str] = None
    class_list: Optional[str] = None  # file of class folder names, or "imagenet100"
    image_size: int = opt(224, ge=8, le=MAX_IMAGE_SIZE, why=f"at most {MAX_IMAGE_SIZE}, 18x the papers' 224")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: int = opt(8, ge=0, le=MAX_THREADS)
    # a fixed random subset of the training set (quick runs, tests)
    max_images: Optional[int] = opt(None, ge=1, why="or null for all images")
    synthetic_root: Optional[str] = None  # Syn2Co: ImageFolder of generated images
    synthetic_ratio: float = opt(0.0, ge=0, le=1)  # fraction of each epoch's samples drawn from synthetic_root
    # replace: epoch size = real size; add: real + synthetic
    synthetic_mode: str = opt("replace", choices=("replace", "add"))


@dataclass
class OptimConfig:
    batch_size: int = opt(128, ge=2, why="the projector and predictor use BatchNorm, which needs at least two "
                                         "images per batch")  # per process
    accum_steps: int = opt(1, ge=1)
    base_lr: float = opt(1.5e-4, gt=0)  # per 512 images of effective batch
    weight_decay: float = opt(0.1, ge=0)
    warmup_epochs: float = opt(40, ge=0)
    min_lr: float = opt(0.0, ge=0)
    clip_grad: Optional[float] = opt(5.0, gt=0, why="or null for no clipping")
    betas: list[float] = opt(factory=lambda: [0.9, 0.999], length=2, ge=0, lt=1, why="AdamW's beta1, beta2")


@dataclass
class KnnConfig:
    k: list[int] = opt(factory=lambda: [10, 20, 100, 200], nonempty=True, ge=1,
                       why="k=0 neighbours would report chance level")
    temperature: float = opt(0.07, gt=0)
    # cap the feature bank of the end-of-run k-NN (None = all)
    max_train: Optional[int] = opt(None, ge=1, why="or null for all")
    max_test: Optional[int] = opt(None, ge=1, why="or null for all")


@dataclass
class Config:
    OWNER = "config key"  # how errors name a key (synco.options)

    method: str = opt("synco", choices=METHODS)
    epochs: int = opt(300, ge=1)
    seed: int = opt(0, **SEED_RANGE)
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    precision: str = opt("auto", choices=("auto", "bf16", "fp32"))
    deterministic: bool = False
    compile: bool = False
    resume: bool = True  # continue automatically when the output dir holds a checkpoint
    log_every: int = opt(10, ge=1, why="metrics are written every log_every steps")
    # also checkpoint every N optimizer steps (0 = only at epoch ends)
    ckpt_every_steps: int = opt(0, ge=0, why="0 = checkpoint at epoch ends only")
    # also checkpoint every N minutes, checked at logged steps (0 = off)
    ckpt_every_minutes: float = opt(0.0, ge=0, why="0 = no timed checkpoints")
    knn_at_end: bool = True
    # k-NN monitor every N epochs, logged to metrics.jsonl as learning curves (0 = off)
    knn_every: int = opt(0, ge=0, why="0 turns the k-NN monitor off")
    threads: int = opt(0, ge=0, le=MAX_THREADS, why=f"0 = torch's default; at most {MAX_THREADS}")
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
# Presets


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("synco.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path_or_name: str) -> tuple[dict, str]:
    from .io import find_yaml

    found, is_path = find_yaml(path_or_name, "synco.presets")
    if is_path:
        text, origin = _read_config_file(found), str(found)
    elif found is None:
        raise SyncoError(f"unknown preset '{path_or_name}'. Available presets: {', '.join(preset_names())}; "
                         "or give the path of a YAML file.")
    else:
        text, origin = found.read_text(), f"preset {path_or_name}"
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise SyncoError(f"{origin} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SyncoError(f"{origin} must be a mapping of config keys.")
    return data, origin


def _read_config_file(path: Path) -> str:
    """The text of a YAML config file, or an error that says why it cannot be one."""
    try:
        if path.is_dir():
            raise SyncoError(f"config file '{path}' is a folder; give a YAML file (a run's config is "
                             f"'{path / 'config.yaml'}').")
        if not path.is_file():
            raise SyncoError(f"config file '{path}' does not exist.")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SyncoError(f"config file '{path}' is not a text YAML file (not UTF-8; a binary file?).") from None
    except OSError as e:  # a name too long for the file system, a loop of links, no permission
        raise SyncoError(f"config file '{path}' cannot be read: {e.strerror or e}.") from None


def load_config(preset: Optional[str] = "cpu-demo", overrides: Optional[list[str]] = None,
                needs_data: bool = True) -> Config:
    """Defaults, then the preset (a shipped name or a YAML path; ``base:`` chains presets), then overrides.
    ``needs_data=False``: the config is wanted for its model or shapes only (a benchmark on random inputs, a
    backbone by preset name), so a dataset without ``data.root`` is not an error."""
    cfg = Config()
    chain: list[dict] = []
    name = preset
    while name:
        data, origin = _read_yaml(name)
        chain.append(data)
        name = data.pop("base", None)
        if name is not None and not isinstance(name, str):
            raise SyncoError(f"{origin}: 'base' must be the name of a preset or the path of a YAML file, got "
                             f"{name!r}.")
        if len(chain) > 10:
            raise SyncoError(f"{origin}: preset 'base' chain is too deep (a cycle?).")
    for data in reversed(chain):
        apply_dict(cfg, data)
    apply_overrides(cfg, overrides or [])
    validate(resolve(cfg), needs_data)
    return cfg


def with_defaults(saved: dict) -> dict:
    """A config saved by an earlier synco, with the fields added since at their defaults: every added field is off by
    default (it changes nothing in a run made before it), so a resume compares like with like. Keys that no longer
    exist are kept, and show as differences."""
    def merge(base: dict, over: dict) -> dict:
        for key, value in over.items():
            nested = isinstance(base.get(key), dict) and isinstance(value, dict) and key != "backbone_kwargs"
            base[key] = merge(base[key], value) if nested else value
        return base

    return merge(Config().to_dict(), saved if isinstance(saved, dict) else {})


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


_bad = key_error("config key")


def resolve(cfg: Config) -> Config:
    """Fill in what a config implies, each with a note on stderr (a step of its own, before :func:`validate`, which
    only checks; :func:`load_config` runs both once, after every override):

    - ``data.root`` given with the built-in digits means a folder dataset;
    - a warm-up longer than the run is clamped to the run;
    - a backbone built for one input size follows ``data.image_size``.
    """
    o, d = cfg.optim, cfg.data
    if d.dataset == "digits" and d.root:
        _note(f"data.root={d.root} is given without data.dataset: using data.dataset=folder (the built-in "
              "digits take no root).")
        d.dataset = "folder"
    if isinstance(o.warmup_epochs, (int, float)) and o.warmup_epochs > cfg.epochs:
        _note(f"optim.warmup_epochs={o.warmup_epochs:g} is more than epochs={cfg.epochs}: the warm-up is clamped "
              f"to {cfg.epochs} epochs (set optim.warmup_epochs=N to choose it).")
        o.warmup_epochs = float(cfg.epochs)
    _follow_image_size(cfg)
    return cfg


def validate(cfg: Config, needs_data: bool = True) -> None:
    """Reject impossible configs early, naming the key. (World-size checks happen at launch.) Each field's own
    bounds are declared on it (synco.options); what follows relates fields to each other."""
    check_options(cfg)
    o, d = cfg.optim, cfg.data
    if o.warmup_epochs > cfg.epochs:
        _bad("optim.warmup_epochs", f"{o.warmup_epochs:g} is more than epochs={cfg.epochs}.")
    validate_negatives(cfg)
    validate_strategy(cfg)
    if d.dataset == "digits" and d.root:
        _bad("data.root", "the built-in digits take no root: set data.dataset=folder for a folder of images.")
    if needs_data and d.dataset != "digits" and not d.root:
        _bad("data.root", f"dataset '{d.dataset}' needs data.root=/path/to/images.")
    validate_augment(d.augment)
    if d.synthetic_ratio > 0 and not d.synthetic_root:
        _bad("data.synthetic_root", "data.synthetic_ratio > 0 needs data.synthetic_root=DIR.")
    _check_image_size(cfg)
    check_memory(cfg)


def check_memory(cfg: Config, physical: Optional[int] = None) -> None:
    """The tensors whose size the config alone sets must fit this machine's memory: the two queues, the heads'
    widest layers (weights, gradients and AdamW's two moments online, weights in the target) and one batch of
    both views in float32. A lower bound, so only configs that cannot run are refused, before an allocator error
    or the OOM killer would stop them."""
    m, c, o, d = cfg.model, cfg.contrast, cfg.optim, cfg.data
    parts = {"contrast.queue_size": 2 * c.queue_size * m.proj_dim * 4 if method_spec(cfg).uses_queue else 0,
             "model.proj_hidden": m.proj_hidden * m.proj_dim * 4 * 5,
             "model.pred_hidden": m.pred_hidden * m.proj_dim * 2 * 4 * 4,
             "data.image_size": o.batch_size * 2 * 3 * d.image_size ** 2 * 4}
    physical = physical or _physical_memory()
    if physical and sum(parts.values()) > physical:
        key = max(parts, key=parts.get)
        _bad(key, f"this config needs at least {sum(parts.values()) / 2**30:,.1f} GiB for its queues, heads and "
                  f"one batch ({parts[key] / 2**30:,.1f} GiB from {key} with optim.batch_size={o.batch_size}, "
                  f"model.proj_dim={m.proj_dim}), more than this machine's {physical / 2**30:,.1f} GiB.")


def _physical_memory() -> Optional[int]:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return None


def validate_negatives(cfg: Config) -> None:
    """The synthetic negatives of a method that uses them (the generator checks its own arguments)."""
    spec, n, c = method_spec(cfg), cfg.negatives, cfg.contrast
    if not spec.uses_synthetic:
        return
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


# timm modules whose models are built for one input size (``img_size``): ViT, DeiT, Swin and relatives.
_FIXED_SIZE_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos",
                       "vision_transformer_sam", "deit", "swin_transformer", "swin_transformer_v2",
                       "swin_transformer_v2_cr", "beit", "eva", "cait", "xcit", "pit", "tnt", "crossvit", "volo")


def _check_image_size(cfg: Config) -> None:
    """The backbone must be built for ``data.image_size``: an explicit, different img_size is an error naming the
    fix (without one, :func:`resolve` builds the backbone for data.image_size)."""
    size, kwargs = cfg.data.image_size, cfg.model.backbone_kwargs
    if "img_size" not in kwargs:
        return
    built = kwargs["img_size"]
    built = built[-1] if isinstance(built, (list, tuple)) and built else built
    if built != size:
        fixed = {**kwargs, "img_size": size}
        text = "{" + ", ".join(f"{k}: {v}" for k, v in fixed.items()) + "}"
        raise SyncoError(
            f"config key 'data.image_size': {size} px images, but the backbone is built for {built} px "
            f"(model.backbone_kwargs.img_size={kwargs['img_size']}). Set both, e.g. data.image_size={size} "
            f"'model.backbone_kwargs={text}', or keep data.image_size={built}.")


def _follow_image_size(cfg: Config) -> None:
    """A timm backbone built for one input size (ViT, Swin, ...) without ``img_size`` in model.backbone_kwargs is
    built for data.image_size when that differs from its default."""
    size, kwargs = cfg.data.image_size, cfg.model.backbone_kwargs
    if "img_size" in kwargs:
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
    """The pairs' order and hue's range (each field's own bounds are declared on AugmentConfig)."""
    for key in ("crop_scale", "crop_ratio", "blur_sigma"):
        low, high = getattr(a, key)
        if low > high:
            _bad(f"data.augment.{key}", f"must be [min, max] with min <= max, got {getattr(a, key)}.")
    if a.jitter[3] > 0.5:
        _bad("data.augment.jitter", f"hue (the 4th value) must be <= 0.5, got {a.jitter[3]}.")
