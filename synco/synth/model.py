"""A small class-conditional diffusion model as saved by `synco synth-data train`: its files, loading,
and seeded sampling with any diffusers scheduler (``scheduler.step``; no diffusion maths is written here).

Everything that decides what an image looks like is seeded per image (initial noise and any
per-step noise come from that image's own ``torch.Generator``), so an image depends on its seed
only, not on which other images shared its batch.

Saved model layout (``save_model``)::

    DIR/unet/                   UNet2DModel.save_pretrained (EMA weights)
    DIR/scheduler/              the training noise schedule (DDPMScheduler.save_pretrained)
    DIR/synco_diffusion.json    class names, image size, channels, null class, sampling defaults
    DIR/preview.png             a grid of samples, one row per class (when trained with preview=true)
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from ..errors import SyncoError

MODEL_FILE = "synco_diffusion.json"
FORMAT = "synco-diffusion"

# Sampler names -> diffusers scheduler classes (all share the training scheduler's config).
SAMPLERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm_sde": "DPMSolverMultistepScheduler",  # algorithm_type sde-dpmsolver++ (stochastic)
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def image_seed(base_seed: int, class_name: str, index: int) -> int:
    """The seed of image ``index`` of class ``class_name``: a hash of the three, so it does not depend on the
    class order, the batch an image falls in, or which images were already there when a run resumed."""
    digest = hashlib.sha256(f"{int(base_seed)}/{class_name}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_scheduler(name: str, config) -> object:
    """A diffusers scheduler ``name`` (see SAMPLERS) configured from ``config`` (a scheduler's config)."""
    import diffusers

    if name not in SAMPLERS:
        raise SyncoError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}.")
    cls = getattr(diffusers, SAMPLERS[name])
    extra = {"algorithm_type": "sde-dpmsolver++"} if name == "dpm_sde" else {}
    # Pass every key of the training schedule on (timestep spacing above all), including the ones it took by
    # default: from_config would otherwise swap those for the new class's defaults, and sampling in the
    # training process would differ from sampling the saved model.
    config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    return cls.from_config(config, **extra)


def _step_takes_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def to_pil(batch: torch.Tensor, resolution: Optional[int] = None) -> list[Image.Image]:
    """[B, C, H, W] in [0, 1] -> PIL images (L for one channel, RGB for three), resized bilinearly (the way
    DigitsDataset renders the real digits) when ``resolution`` differs from H."""
    arr = (batch.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        img = Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a, mode="RGB")
        if resolution and img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.Resampling.BILINEAR)
        out.append(img)
    return out


@dataclass
class SmallDiffusion:
    """A trained model: UNet, training scheduler and metadata (see :func:`load_model`)."""

    unet: torch.nn.Module
    scheduler: object
    meta: dict
    path: Optional[Path] = None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def null_class(self) -> int:
        return int(self.meta["null_class"])

    def to(self, device) -> SmallDiffusion:
        self.unet.to(device)
        return self

    @torch.no_grad()
    def sample(self, labels: list[int], seeds: list[int], sampler: Optional[str] = None,
               steps: Optional[int] = None, guidance: Optional[float] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """Images [B, C, S, S] in [0, 1] for class ids ``labels``, image i drawn from ``seeds[i]`` only."""
        if len(labels) != len(seeds):
            raise ValueError("one seed per label")
        sampler = sampler or self.meta["sampler"]
        steps = int(steps or self.meta["sample_steps"])
        guidance = float(self.meta["guidance"] if guidance is None else guidance)
        if guidance != 1.0 and not self.meta.get("p_uncond", 0):
            raise SyncoError("guidance != 1 needs a model trained with label dropout (p_uncond > 0); this one "
                             "was not. Use guidance=1.")
        device = device or next(self.unet.parameters()).device
        dtype = next(self.unet.parameters()).dtype
        sched = make_scheduler(sampler, self.scheduler.config)
        s, c = int(self.meta["image_size"]), int(self.meta["channels"])
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        from diffusers.utils.torch_utils import randn_tensor

        x = randn_tensor((len(seeds), c, s, s), generator=gens, device=device, dtype=torch.float32)
        x = x * sched.init_noise_sigma
        y = torch.tensor(labels, device=device, dtype=torch.long)
        null = torch.full_like(y, self.null_class)
        sched.set_timesteps(steps, device=device)
        step_kwargs = {"generator": gens} if _step_takes_generator(sched) else {}
        self.unet.eval()
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t).to(dtype)
            if guidance != 1.0:
                cond, uncond = self.unet(torch.cat([inp, inp]), t, class_labels=torch.cat([y, null])).sample.chunk(2)
                eps = uncond + guidance * (cond - uncond)  # classifier-free guidance, as in diffusers pipelines
            else:
                eps = self.unet(inp, t, class_labels=y).sample
            x = sched.step(eps.float(), t, x, **step_kwargs).prev_sample
        return (x / 2 + 0.5).clamp(0, 1)


def is_model_dir(path) -> bool:
    return (Path(path) / MODEL_FILE).is_file()


def load_model(path, device="cpu", dtype=torch.float32) -> SmallDiffusion:
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(path)
    meta_path = path / MODEL_FILE
    if not meta_path.is_file():
        raise SyncoError(f"'{path}' is not a model made by `synco synth-data train` (no {MODEL_FILE}). Train "
                         f"one with `synco synth-data train --data digits --out {path}`.")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        # low_cpu_mem_usage=False: the model is small, and without `accelerate` diffusers would warn otherwise.
        unet = UNet2DModel.from_pretrained(path / "unet", local_files_only=True, dtype=dtype, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise SyncoError(f"cannot load the diffusion model in '{path}' ({e.__class__.__name__}: {str(e)[:200]}). "
                         "The directory is incomplete or damaged; train it again.") from None
    return SmallDiffusion(unet.to(device).eval(), scheduler, meta, path)


def save_model(model: SmallDiffusion, path) -> None:
    """``save_pretrained`` for the UNet and scheduler, then the metadata file last (its presence marks a
    complete model)."""
    from ..io import atomic_write_text

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(path / "unet")
    model.scheduler.save_pretrained(path / "scheduler")
    atomic_write_text(json.dumps(model.meta, indent=2) + "\n", path / MODEL_FILE)


def write_preview(model: SmallDiffusion, path, per_class: int = 10, seed: int = 12345, device=None) -> Path:
    """A grid, one row per class (first 16 classes), of samples with the model's default sampler."""
    classes = model.classes[:16]
    labels = [c for c in range(len(classes)) for _ in range(per_class)]
    seeds = [image_seed(seed, model.classes[c], i) for c in range(len(classes)) for i in range(per_class)]
    imgs = model.sample(labels, seeds, device=device)
    res = int(model.meta.get("resolution") or model.meta["image_size"])
    tiles = to_pil(imgs, res)
    grid = Image.new("RGB", (per_class * (res + 2), len(classes) * (res + 2)), "white")
    for k, tile in enumerate(tiles):
        r, c = divmod(k, per_class)
        grid.paste(tile.convert("RGB"), (c * (res + 2) + 1, r * (res + 2) + 1))
    scale = max(1, 256 // max(grid.size))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    grid.save(path)
    return Path(path)
