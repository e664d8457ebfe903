"""The models `synco synth-data generate` (generate.py) samples from: one trained by `synco synth-data train`, or a
diffusers class-conditional pipeline, each mapping class folder names to its own class ids."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Protocol

import torch

from ..errors import SyncoError
from .model import is_model_dir, load_model, make_scheduler, to_pil


class Sampling(Protocol):
    """What a backend reads of ``synco synth-data generate``'s options (GenerateConfig has these fields)."""

    sampler: str
    steps: int
    guidance: Optional[float]
    resolution: int
    dtype: str
    cache_dir: Optional[str]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


WNID = re.compile(r"^n\d{8}$")


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


class SyncoBackend:
    """A model trained by ``synco synth-data train``."""

    kind = "synco"

    def __init__(self, path: Path, cfg: Sampling, device: torch.device):
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

    def __init__(self, model: str, cfg: Sampling, device: torch.device):
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


def load_backend(model: str, cfg: Sampling, device: torch.device):
    path = Path(model).expanduser()
    if is_model_dir(path):
        return SyncoBackend(path, cfg, device)
    return PipelineBackend(model, cfg, device)
