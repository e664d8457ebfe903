"""Generate a synthetic ImageFolder clone of a labelled dataset with a class-conditional diffusion model.

``OUT/<class>/<index>.<ext>`` for ``index < per_class``, plus

* ``OUT/manifest.jsonl``: one JSON line per image: file, class, class_id, index, seed, model, sampler,
  steps, guidance, resolution.
* ``OUT/generation.json``: the settings (checked again when a run resumes) and the last run's figures.

Resumable: images are written to a hidden temporary name and renamed into place (``os.replace``), so an
image file that exists is complete; a re-run skips them, removes the temporary files of writers that are gone
(a live one's are left alone), reconciles the manifest with the files present and generates only what is
missing. The settings are checked against ``generation.json`` and every manifest entry first: a damaged one of
either is refused, never read as empty (that would switch the check off). Image ``(class, index)`` is drawn from
``image_seed(seed, class, index)`` alone, so it comes out the same whatever batch it falls into.

Models (``--model``):

* a directory written by ``synco synth-data train`` (``synco_diffusion.json``);
* a diffusers class-conditional pipeline (one whose ``__call__`` takes ``class_labels``, e.g.
  ``DiTPipeline``) from a local directory (``model_index.json``) or a hub id already in the Hugging Face
  cache (loaded with ``local_files_only=True``: never a download). Class folder names are mapped to the
  pipeline's class ids: ImageNet wnids (``n01440764``) to their ImageNet-1k index (timm's ``ImageNetInfo``),
  integers to themselves, other names through the pipeline's own label table (DiT's ``id2label``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..device import resolve_device
from ..errors import SyncoError
from ..options import MAX_IMAGE_SIZE, MAX_THREADS, SEED_RANGE, check_options, opt
from .model import SAMPLERS, image_seed, is_model_dir, load_model, make_scheduler, to_pil

MANIFEST = "manifest.jsonl"
SETTINGS = "generation.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WNID = re.compile(r"^n\d{8}$")
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass
class GenerateConfig:
    """``synco synth-data generate`` options (``key=value``)."""

    OWNER = "synth-data generate option"  # how errors name a key (synco.options)

    # default = the model's own; or ddpm | ddim | dpm | dpm_sde | euler | euler_a | unipc
    sampler: str = opt("default", choices=("default", *SAMPLERS))
    # sampling steps; 0 = the model's default (synco models: as trained; pipelines: 50)
    steps: int = opt(0, ge=0, why="0 = the model's default")
    # classifier-free guidance scale; None = the model's default (DiT: 4.0)
    guidance: Optional[float] = opt(None, ge=0, why="1 = no guidance; null = the model's default")
    seed: int = opt(0, **SEED_RANGE)  # base seed; image (class, index) uses image_seed(seed, class, index)
    batch_size: int = opt(64, ge=1, le=2**16)
    # output size in pixels (bilinear resize); 0 = the model's default
    resolution: int = opt(0, ge=0, le=MAX_IMAGE_SIZE, why="0 = the model's default")
    format: str = opt("png", choices=tuple(FORMATS))
    quality: int = opt(95, ge=1, le=100)  # jpg / webp quality
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    # auto (fp16 for pipelines on CUDA, else fp32) | fp32 | fp16 | bf16
    dtype: str = opt("auto", choices=("auto", "fp32", "fp16", "bf16"))
    # torch CPU threads; 1 is fastest for small models on a shared CPU (0 = torch default)
    threads: int = opt(1, ge=0, le=MAX_THREADS)
    # Hugging Face cache to look in (default: the standard one; a missing one says how to fill it)
    cache_dir: Optional[str] = None


# Settings that must match when resuming into an existing output directory.
IDENTITY_KEYS = ("model", "sampler", "steps", "guidance", "seed", "resolution", "format")


def validate_generate_config(cfg: GenerateConfig) -> None:
    """Each field's bounds are declared on GenerateConfig (no rule relates two of them)."""
    check_options(cfg)


# ---------------------------------------------------------------------------------------------
# Class lists and ImageNet ids


def parse_classes(spec: Optional[str], available: Optional[list[str]] = None) -> list[str]:
    """``all`` / None (every class of the model), a shipped list name (``imagenet100``), a file with one name per
    line, or a comma-separated list."""
    from ..data.folder import SHIPPED_CLASS_LISTS, load_class_list

    if spec is None or spec == "all":
        if available is None:
            raise SyncoError("this model has no class list of its own: pass --classes (a file with one class "
                             "folder name per line, a shipped list such as imagenet100, or a comma-separated list).")
        return list(available)
    if spec in SHIPPED_CLASS_LISTS or Path(spec).is_file():
        return load_class_list(spec)
    if Path(spec).suffix in (".txt", ".lst") or os.sep in spec:
        raise SyncoError(f"class list file '{spec}' does not exist. Pass a file with one class name per line, a "
                         f"shipped list ({', '.join(SHIPPED_CLASS_LISTS)}), 'all', or a comma-separated list.")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise SyncoError("--classes is empty.")
    return list(dict.fromkeys(names))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order (timm ships the list; no download)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def imagenet_class_ids(wnids: list[str]) -> dict[str, int]:
    """wnid -> ImageNet-1k class index (the ids DiT and other ImageNet class-conditional models use)."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise SyncoError(f"{len(unknown)} class(es) are not ImageNet-1k wnids: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}. ImageNet class-conditional models only know the "
                         "1000 ImageNet-1k classes.")
    return {w: index[w] for w in wnids}


# ---------------------------------------------------------------------------------------------
# Backends


class SyncoBackend:
    """A model trained by ``synco synth-data train``."""

    kind = "synco"

    def __init__(self, path: Path, cfg: GenerateConfig, device: torch.device):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype, torch.float32)
        self.model = load_model(path, device=device, dtype=dtype)
        self.device = device
        meta = self.model.meta
        self.name = str(Path(path).resolve())
        self.sampler = meta["sampler"] if cfg.sampler == "default" else cfg.sampler
        self.steps = cfg.steps or int(meta["sample_steps"])
        self.guidance = float(meta["guidance"] if cfg.guidance is None else cfg.guidance)
        self.resolution = cfg.resolution or int(meta.get("resolution") or meta["image_size"])
        self.available = self.model.classes

    def class_ids(self, classes: list[str]) -> dict[str, int]:
        index = {c: i for i, c in enumerate(self.available)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise SyncoError(f"the model in '{self.name}' was not trained on class(es) {', '.join(unknown[:5])}; it "
                             f"knows {', '.join(self.available[:10])}{' ...' if len(self.available) > 10 else ''}.")
        return {c: index[c] for c in classes}

    def generate(self, ids: list[int], seeds: list[int]):
        x = self.model.sample(ids, seeds, sampler=self.sampler, steps=self.steps, guidance=self.guidance,
                              device=self.device)
        return to_pil(x, self.resolution)


def _missing_model_message(model: str, cache_dir: Optional[str]) -> str:
    hub = HUB_ID.match(model) and not model.startswith((".", "/", "~"))
    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    lines = [f"model '{model}' was not found: there is no such local directory"]
    if hub:
        lines[0] += f", and no copy of the hub model '{model}' in the Hugging Face cache ({cache})"
    lines[0] += " (no download is attempted)."
    lines.append("Give --model a directory made by `synco synth-data train`, a local diffusers pipeline directory "
                 "(with model_index.json), or a hub id already downloaded.")
    example = model if hub else "facebook/DiT-XL-2-256"
    lines.append(f"To get pretrained weights once, on a machine with network: `huggingface-cli download {example}` "
                 f"(or `hf download {example}`), then pass --model {example}, or download with --local-dir DIR "
                 f"and pass --model DIR.")
    return " ".join(lines)


class PipelineBackend:
    """A diffusers class-conditional pipeline (``__call__(class_labels=...)``), e.g. DiTPipeline."""

    kind = "diffusers"

    def __init__(self, model: str, cfg: GenerateConfig, device: torch.device):
        import inspect

        from diffusers import DiffusionPipeline

        if cfg.dtype == "auto":
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        else:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
        path = Path(model).expanduser()
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise SyncoError(f"'{model}' is neither a model made by `synco synth-data train` (no "
                             f"synco_diffusion.json) nor a diffusers pipeline directory (no model_index.json).")
        if not path.is_dir() and not HUB_ID.match(model):
            raise SyncoError(_missing_model_message(model, cfg.cache_dir))
        source = str(path) if path.is_dir() else model
        import importlib.util

        extra = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}  # no warning
        try:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=True,
                                                     cache_dir=cfg.cache_dir, **extra)
        except (OSError, ValueError) as e:
            if path.is_dir():
                raise SyncoError(f"cannot load the diffusers pipeline in '{model}' ({e.__class__.__name__}: "
                                 f"{str(e)[:300]}).") from None
            raise SyncoError(_missing_model_message(model, cfg.cache_dir)) from None
        if "class_labels" not in inspect.signature(pipe.__call__).parameters:
            raise SyncoError(f"'{model}' is a {type(pipe).__name__}, not a class-conditional pipeline (its __call__ "
                             "takes no class_labels). Use a class-conditional model such as "
                             "facebook/DiT-XL-2-256.")
        if cfg.sampler != "default":
            pipe.scheduler = make_scheduler(cfg.sampler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.device = device
        self.name = model
        self.sampler = cfg.sampler if cfg.sampler != "default" else type(pipe.scheduler).__name__
        self.steps = cfg.steps or 50
        self.guidance = float(4.0 if cfg.guidance is None else cfg.guidance)
        native = getattr(getattr(pipe, "transformer", None), "config", None)
        vae = getattr(pipe, "vae", None)
        if native is not None and vae is not None:
            native = int(native.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        else:
            native = None
        self.resolution = cfg.resolution or native or 0
        self.available = None

    def class_ids(self, classes: list[str]) -> dict[str, int]:
        ids: dict[str, int] = {}
        wnids = [c for c in classes if WNID.match(c)]
        ids.update(imagenet_class_ids(wnids) if wnids else {})
        labels = getattr(self.pipe, "labels", {}) or {}
        for c in classes:
            if c in ids:
                continue
            if c.isdigit():
                ids[c] = int(c)
            elif c in labels:
                ids[c] = int(labels[c])
            else:
                raise SyncoError(f"class '{c}' cannot be mapped to a class id of {self.name}: use ImageNet wnids "
                                 "(n01440764), integer class ids, or the pipeline's label names.")
        return ids

    def generate(self, ids: list[int], seeds: list[int]):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        images = self.pipe(class_labels=ids, guidance_scale=self.guidance, generator=gens,
                           num_inference_steps=self.steps, output_type="pil").images
        if self.resolution:
            from PIL import Image

            images = [im if im.size == (self.resolution, self.resolution)
                      else im.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC) for im in images]
        return images


def load_backend(model: str, cfg: GenerateConfig, device: torch.device):
    path = Path(model).expanduser()
    if is_model_dir(path):
        return SyncoBackend(path, cfg, device)
    return PipelineBackend(model, cfg, device)


# ---------------------------------------------------------------------------------------------
# Output folder bookkeeping


def image_name(index: int, fmt: str) -> str:
    return f"{index:05d}.{fmt}"


def _damaged(path: Path, why: str, fix: str) -> SyncoError:
    return SyncoError(f"'{path}' is damaged ({why}): the settings of the images already in '{path.parent}' cannot "
                      f"be checked, and images made with other settings would be mixed in unseen. {fix}")


def _read_manifest(path: Path) -> list[dict]:
    """The manifest's entries; a line cut short by a kill (not JSON) is skipped, but a line that is JSON and not
    an entry means the file was damaged or replaced, and is refused rather than rewritten as if consistent."""
    entries = []
    if not path.is_file():
        return entries
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and entry["file"].count("/") == 1
                and not entry["file"].startswith(("/", "."))):
            raise _damaged(path, f"line {n} is not an entry of the form {{\"file\": \"<class>/<image>\", ...}}",
                           "Delete it to have it rebuilt from the images present, or use a new --out.")
        entries.append(entry)
    return entries


def _recorded_settings(path: Path) -> Optional[dict]:
    """generation.json's settings, None when there is none; a damaged one is refused (reading it as empty
    would switch the settings check off)."""
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, f"not JSON: {e.__class__.__name__}", _SETTINGS_FIX) from None
    if not isinstance(old, dict):
        raise _damaged(path, f"a JSON {type(old).__name__}, not an object", _SETTINGS_FIX)
    return old


_SETTINGS_FIX = ("Restore it, or delete it: the images are then checked against manifest.jsonl, whose entries carry "
                 "the settings that made each of them.")


def _manifest_differences(entries: list[dict], settings: dict, seed: int, fmt: str) -> dict:
    """key -> (recorded, now) for the settings manifest entries were made with that differ from ``settings``."""
    diff = {}
    for e in entries:
        for k in ("model", "sampler", "steps", "guidance", "resolution"):
            if k in e and e[k] != settings[k]:
                diff.setdefault(k, (e[k], settings[k]))
        if all(k in e for k in ("seed", "class", "index")) and e["seed"] != image_seed(seed, str(e["class"]),
                                                                                      e["index"]):
            diff.setdefault("seed", ("another base seed", seed))
        if Path(e["file"]).suffix[1:] != fmt:
            diff.setdefault("format", (Path(e["file"]).suffix[1:], fmt))
    return diff


def _check_settings(out: Path, settings: dict, names: list[str], entries: list[dict], seed: int) -> list[str]:
    """Refuse to add to ``out`` with other settings than its images were made with (generation.json and every
    manifest entry); returns every class the folder then holds."""
    old = _recorded_settings(out / SETTINGS)
    diff = {k: (old[k], settings[k]) for k in IDENTITY_KEYS if old is not None and k in old and old[k] != settings[k]}
    for k, v in _manifest_differences(entries, settings, seed, settings["format"]).items():
        diff.setdefault(k, v)
    if diff:
        raise SyncoError(f"'{out}' already holds images generated with other settings ("
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                         + "). Use the same settings to resume or extend it, or a new --out.")
    classes = old.get("classes", []) if old is not None else []
    listed = [str(c) for c in classes] if isinstance(classes, list) else []
    return list(dict.fromkeys([*listed, *(str(e.get("class")) for e in entries if "class" in e), *names]))


def _remove_temp_files(out: Path, classes: list[str]) -> int:
    """Temp files of writers that are gone (killed mid-write); a live writer's (another generate on the same
    folder) is left alone."""
    from ..io import remove_stale_temps

    return sum(len(remove_stale_temps(d)) for d in (out, *(out / c for c in classes)))


def _atomic_image(img, path: Path, fmt: str, quality: int) -> None:
    from ..io import atomic_write_bytes_with

    kwargs = {"quality": quality} if FORMATS[fmt] in ("JPEG", "WEBP") else {}
    if FORMATS[fmt] == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    atomic_write_bytes_with(path, lambda tmp: img.save(tmp, format=FORMATS[fmt], **kwargs))


def generate(model: str, classes: Optional[str | list[str]], per_class: int, out,
             cfg: Optional[GenerateConfig] = None, progress: bool = True) -> dict:
    """Fill ``out`` with ``per_class`` images for each class (see the module docstring). Returns figures:
    total, generated, skipped, seconds, images_per_second."""
    from tqdm.auto import tqdm

    from ..io import atomic_write_text

    cfg = cfg or GenerateConfig()
    validate_generate_config(cfg)
    if per_class < 1:
        raise SyncoError("--per-class must be >= 1.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    backend = load_backend(model, cfg, device)
    names = classes if isinstance(classes, list) else parse_classes(classes, backend.available)
    bad = [c for c in names if not c or c.startswith(".") or "/" in c or "\\" in c]
    if bad:
        raise SyncoError(f"class name(s) {', '.join(map(repr, bad[:5]))} cannot be folder names (empty, hidden or "
                         "containing a path separator).")
    ids = backend.class_ids(names)
    fmt = "jpg" if cfg.format == "jpeg" else cfg.format
    settings = {"model": backend.name, "backend": backend.kind, "sampler": backend.sampler, "steps": backend.steps,
                "guidance": backend.guidance, "seed": cfg.seed, "resolution": backend.resolution, "format": fmt}

    out = Path(out)
    settings_path, manifest_path = out / SETTINGS, out / MANIFEST
    recorded = _read_manifest(manifest_path)
    listed = _check_settings(out, settings, names, recorded, cfg.seed)  # every class the folder holds
    out.mkdir(parents=True, exist_ok=True)
    for c in names:
        (out / c).mkdir(exist_ok=True)
    removed = _remove_temp_files(out, names)

    # Reconcile the manifest with the files present: drop entries whose file is gone or duplicated, add
    # entries for files written just before a kill (their seed follows from the settings, checked above).
    def entry(c: str, i: int) -> dict:
        return {"file": f"{c}/{image_name(i, fmt)}", "class": c, "class_id": ids[c], "index": i,
                "seed": image_seed(cfg.seed, c, i), **{k: settings[k] for k in ("model", "sampler", "steps",
                                                                                  "guidance", "resolution")}}

    kept: dict[str, dict] = {}
    for e in recorded:
        if e["file"] not in kept and (out / e["file"]).is_file():
            kept[e["file"]] = e
    pending = []
    skipped = 0
    for i in range(per_class):  # index-major: a partial run is balanced across classes
        for c in names:
            f = f"{c}/{image_name(i, fmt)}"
            if (out / f).is_file():
                skipped += 1
                kept.setdefault(f, entry(c, i))
            else:
                pending.append((c, i))
    atomic_write_text("".join(json.dumps(e) + "\n" for e in kept.values()), manifest_path)
    atomic_write_text(json.dumps({**settings, "classes": listed, "per_class": per_class, "status": "running"},
                                 indent=2) + "\n", settings_path)
    total = per_class * len(names)
    print(f"synco: {total} images ({len(names)} classes x {per_class}) from {backend.name} with {backend.sampler}, "
          f"{backend.steps} steps, guidance {backend.guidance} -> {out}: {skipped} already there, "
          f"{len(pending)} to generate" + (f" ({removed} temporary files removed)" if removed else ""),
          file=sys.stderr)

    bar = tqdm(total=len(pending), desc="generate", unit="img", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    done = 0
    with open(manifest_path, "a") as manifest:
        for start in range(0, len(pending), cfg.batch_size):
            chunk = pending[start:start + cfg.batch_size]
            seeds = [image_seed(cfg.seed, c, i) for c, i in chunk]
            images = backend.generate([ids[c] for c, _ in chunk], seeds)
            lines = []
            for (c, i), img in zip(chunk, images):
                _atomic_image(img, out / c / image_name(i, fmt), fmt, cfg.quality)
                lines.append(json.dumps(entry(c, i)) + "\n")
            manifest.write("".join(lines))
            manifest.flush()
            done += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(img_s=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    seconds = time.perf_counter() - t0
    rate = done / seconds if done else 0.0
    figures = {"total": total, "generated": done, "skipped": skipped, "seconds": round(seconds, 3),
               "images_per_second": round(rate, 3), "device": str(device)}
    atomic_write_text(json.dumps({**settings, "classes": listed, "per_class": per_class, "status": "complete",
                                  "last_run": figures}, indent=2) + "\n", settings_path)
    print(f"synco: generated {done} images in {seconds:.1f} s ({rate:.2f} images/s); {total} in {out}",
          file=sys.stderr)
    return figures
