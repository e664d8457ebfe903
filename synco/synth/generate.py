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
``image_seed(seed, class, index)`` alone, so it comes out the same whatever batch it falls into. ``--out`` is
checked writable before the model loads, and one generate at a time holds it (``OUT/.synco.lock``).

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..device import resolve_device
from ..errors import SyncoError
from ..options import MAX_IMAGE_SIZE, MAX_THREADS, SEED_RANGE, check_options, opt
from .backends import load_backend
from .model import SAMPLERS, image_seed
from .output_folder import MANIFEST, image_name, manifest_entry, prepare_folder, write_settings

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


def validate_generate_config(cfg: GenerateConfig) -> None:
    """Each field's bounds are declared on GenerateConfig (no rule relates two of them)."""
    check_options(cfg)


# ---------------------------------------------------------------------------------------------
# Class lists


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


# ---------------------------------------------------------------------------------------------
# Backends


# ---------------------------------------------------------------------------------------------
# Output folder bookkeeping


def _atomic_image(img, path: Path, fmt: str, quality: int) -> None:
    from ..io import atomic_write_bytes_with

    kwargs = {"quality": quality} if FORMATS[fmt] in ("JPEG", "WEBP") else {}
    if FORMATS[fmt] == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    atomic_write_bytes_with(path, lambda tmp: img.save(tmp, format=FORMATS[fmt], **kwargs))


def _class_folders(classes: Optional[str | list[str]], backend) -> list[str]:
    names = classes if isinstance(classes, list) else parse_classes(classes, backend.available)
    unusable = [c for c in names if not c or c.startswith(".") or "/" in c or "\\" in c]
    if unusable:
        raise SyncoError(f"class name(s) {', '.join(map(repr, unusable[:5]))} cannot be folder names (empty, hidden "
                         "or containing a path separator).")
    return names


def _settings(backend, cfg: GenerateConfig) -> dict:
    """What the images are made with, as generation.json records it and a resumed run must match."""
    return {"model": backend.name, "backend": backend.kind, "sampler": backend.sampler, "steps": backend.steps,
            "guidance": backend.guidance, "seed": cfg.seed, "resolution": backend.resolution,
            "format": "jpg" if cfg.format == "jpeg" else cfg.format}


def _sample_pending(backend, pending: list, ids: dict[str, int], settings: dict, out: Path, cfg: GenerateConfig,
                    progress: bool) -> tuple[int, float]:
    """(images made, seconds): ``pending`` sampled batch by batch, each image written atomically and then listed
    in the manifest."""
    from tqdm.auto import tqdm

    fmt = settings["format"]
    bar = tqdm(total=len(pending), desc="generate", unit="img", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    done = 0
    with open(out / MANIFEST, "a") as manifest:
        for start in range(0, len(pending), cfg.batch_size):
            chunk = pending[start:start + cfg.batch_size]
            seeds = [image_seed(cfg.seed, c, i) for c, i in chunk]
            images = backend.generate([ids[c] for c, _ in chunk], seeds)
            lines = []
            for (c, i), img in zip(chunk, images):
                _atomic_image(img, out / c / image_name(i, fmt), fmt, cfg.quality)
                lines.append(json.dumps(manifest_entry(settings, c, ids[c], i)) + "\n")
            manifest.write("".join(lines))
            manifest.flush()
            done += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(img_s=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    return done, time.perf_counter() - t0


def generate(model: str, classes: Optional[str | list[str]], per_class: int, out,
             cfg: Optional[GenerateConfig] = None, progress: bool = True) -> dict:
    """Fill ``out`` with ``per_class`` images for each class (see the module docstring). Returns figures:
    total, generated, skipped, seconds, images_per_second."""
    from ..io import claimed_output_dir

    cfg = cfg or GenerateConfig()
    validate_generate_config(cfg)
    if per_class < 1:
        raise SyncoError("--per-class must be >= 1.")
    # Checked before the model loads (an unwritable --out fails at once), and locked: a second generate on the same
    # folder would rewrite the manifest and generation.json under the first and make the same images twice.
    with claimed_output_dir(out, "synth-data generate") as out:
        return _generate_into(model, classes, per_class, out, cfg, progress)


def _generate_into(model: str, classes: Optional[str | list[str]], per_class: int, out: Path, cfg: GenerateConfig,
                   progress: bool) -> dict:
    """generate's work, once ``out`` is checked and locked."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    backend = load_backend(model, cfg, device)
    names = _class_folders(classes, backend)
    ids = backend.class_ids(names)
    settings = _settings(backend, cfg)

    plan = prepare_folder(out, settings, names, ids, per_class)
    total = per_class * len(names)
    print(f"synco: {total} images ({len(names)} classes x {per_class}) from {backend.name} with {backend.sampler}, "
          f"{backend.steps} steps, guidance {backend.guidance} -> {out}: {plan.skipped} already there, "
          f"{len(plan.pending)} to generate" + (f" ({plan.removed} temporary files removed)" if plan.removed else ""),
          file=sys.stderr)

    done, seconds = _sample_pending(backend, plan.pending, ids, settings, out, cfg, progress)
    rate = done / seconds if done else 0.0
    figures = {"total": total, "generated": done, "skipped": plan.skipped, "seconds": round(seconds, 3),
               "images_per_second": round(rate, 3), "device": str(device)}
    write_settings(out, settings, plan.classes, per_class, "complete", last_run=figures)
    print(f"synco: generated {done} images in {seconds:.1f} s ({rate:.2f} images/s); {total} in {out}",
          file=sys.stderr)
    return figures
