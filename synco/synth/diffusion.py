"""A small class-conditional diffusion model (diffusers ``UNet2DModel`` + a diffusers scheduler).

Training is the standard epsilon objective: noise an image with ``scheduler.add_noise`` at a random
timestep and regress the UNet's prediction onto the noise (MSE). Labels are dropped to a "null" class
with probability ``p_uncond`` so the model can also be sampled with classifier-free guidance. Sampling
runs any diffusers scheduler (``scheduler.step``); no diffusion maths is written here.

Everything that decides what an image looks like is seeded per image (initial noise and any
per-step noise come from that image's own ``torch.Generator``), so an image depends on its seed
only, not on which other images shared its batch.

Saved model layout (``save_model``)::

    DIR/unet/                   UNet2DModel.save_pretrained (EMA weights)
    DIR/scheduler/              the training noise schedule (DDPMScheduler.save_pretrained)
    DIR/synco_diffusion.json    class names, image size, channels, null class, sampling defaults
    DIR/preview.png             a grid of samples, one row per class (when trained with preview=true)

On the built-in ``digits`` the model works at the digits' native 8x8 resolution, in grayscale, and
``generate`` upsamples bilinearly to ``resolution`` (16 by default, the cpu-demo size): exactly how
:class:`synco.data.digits.DigitsDataset` renders the real digits, so real and synthetic images go
through the same last step.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from ..device import resolve_device  # noqa: F401 (generate imports it from here)
from ..errors import SyncoError

logger = logging.getLogger("synco.synth")

MODEL_FILE = "synco_diffusion.json"
STATE_FILE = "train_state.pt"
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


@dataclass
class DiffusionTrainConfig:
    """``synco synth-data train`` options (``key=value``)."""

    image_size: int = 0  # 0 = dataset default: 8 for digits (their native size), 32 for image folders
    channels: int = 0  # 0 = 1 (grayscale) for digits, 3 for image folders
    resolution: int = 0  # default output size for generate; 0 = 16 for digits (cpu-demo), image_size otherwise
    class_list: Optional[str] = None  # image folders: only these classes (file or shipped name)
    # The defaults are sized for the built-in digits (about 3 CPU-minutes); give image folders a bigger UNet,
    # e.g. block_out_channels=[64,128,256] attention=[false,true,true] image_size=32, and more steps.
    block_out_channels: list = field(default_factory=lambda: [16, 32])
    attention: list = field(default_factory=lambda: [False, True])  # self-attention per UNet level
    layers_per_block: int = 1
    norm_num_groups: int = 8
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    ema_decay: float = 0.995
    p_uncond: float = 0.1  # label dropout, enables classifier-free guidance
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    hflip: bool = False  # random horizontal flips (never for digits)
    sampler: str = "dpm"  # default sampler stored with the model
    sample_steps: int = 20  # default number of sampling steps stored with the model
    guidance: float = 2.0  # default classifier-free guidance scale stored with the model (1 = none)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    threads: int = 1  # torch CPU threads; 1 is fastest for small models on a shared CPU (0 = torch default)
    num_workers: int = 0  # DataLoader workers for image folders
    log_every: int = 50
    ckpt_every: int = 500  # save a resumable training state every N steps (0 = only at the end)
    preview: bool = True  # write preview.png (samples per class) after training


# Keys that may differ when a killed training run is resumed.
RESUMABLE_KEYS = {"steps", "device", "threads", "num_workers", "log_every", "ckpt_every", "preview",
                  "sampler", "sample_steps", "guidance", "resolution"}


def validate_train_config(cfg: DiffusionTrainConfig) -> None:
    def bad(key, msg):
        raise SyncoError(f"synth-data train option '{key}': {msg}")

    if cfg.image_size < 0 or (0 < cfg.image_size < 4):
        bad("image_size", "must be >= 4 (or 0 for the dataset default).")
    if cfg.channels not in (0, 1, 3):
        bad("channels", "must be 1 (grayscale), 3 (RGB) or 0 (dataset default).")
    if cfg.resolution < 0:
        bad("resolution", "must be >= 0.")
    if not cfg.block_out_channels or any(not isinstance(c, int) or c < 1 for c in cfg.block_out_channels):
        bad("block_out_channels", "must be a list of positive channel counts, e.g. [32, 64].")
    if len(cfg.attention) != len(cfg.block_out_channels):
        bad("attention", f"needs one true/false per UNet level ({len(cfg.block_out_channels)} levels, "
                         f"from block_out_channels).")
    if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
        bad("norm_num_groups", f"must divide every entry of block_out_channels {cfg.block_out_channels}.")
    for key in ("steps", "batch_size", "layers_per_block", "num_train_timesteps", "sample_steps", "log_every"):
        if getattr(cfg, key) < 1:
            bad(key, "must be >= 1.")
    if cfg.lr <= 0:
        bad("lr", "must be > 0.")
    if not 0.0 <= cfg.ema_decay < 1.0:
        bad("ema_decay", "must be in [0, 1).")
    if not 0.0 <= cfg.p_uncond < 1.0:
        bad("p_uncond", "must be in [0, 1).")
    if cfg.guidance != 1.0 and cfg.p_uncond == 0:
        bad("guidance", "classifier-free guidance needs a model trained with p_uncond > 0.")
    if cfg.sampler not in SAMPLERS:
        bad("sampler", f"must be one of {', '.join(SAMPLERS)}.")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad("device", "must be auto, cpu or cuda.")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        bad("precision", "must be auto, bf16 or fp32.")
    if cfg.warmup_steps < 0 or cfg.ckpt_every < 0 or cfg.num_workers < 0 or cfg.threads < 0:
        bad("warmup_steps", "warmup_steps, ckpt_every, num_workers and threads must be >= 0.")


# ---------------------------------------------------------------------------------------------
# Helpers shared with generate


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


def build_noise_scheduler(cfg: DiffusionTrainConfig):
    """The training noise schedule (DDPM), every sampling-relevant key explicit."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=0.0001, beta_end=0.02, prediction_type="epsilon", clip_sample=True,
                         clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0,
                         variance_type="fixed_small")


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


# ---------------------------------------------------------------------------------------------
# The saved model


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

    def to(self, device) -> "SmallDiffusion":
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


def build_unet(cfg: DiffusionTrainConfig, image_size: int, channels: int, num_classes: int):
    from diffusers import UNet2DModel

    levels = len(cfg.block_out_channels)
    if image_size % (2 ** (levels - 1)):
        raise SyncoError(f"image_size {image_size} must be divisible by 2^(levels-1) = {2 ** (levels - 1)} for a "
                         f"{levels}-level UNet (block_out_channels={cfg.block_out_channels}).")
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)]
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(cfg.block_out_channels), down_block_types=tuple(down),
                       up_block_types=tuple(up), layers_per_block=cfg.layers_per_block,
                       norm_num_groups=cfg.norm_num_groups, attention_head_dim=8,
                       num_class_embeds=num_classes + 1)  # + the null class for classifier-free guidance


# ---------------------------------------------------------------------------------------------
# Training data


class _TensorBatches:
    """An in-memory dataset: batch ``step`` is drawn from a generator seeded by (seed, step), so training is a
    pure function of the step and a resumed run continues exactly."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, hflip: bool):
        self.images, self.labels, self.batch_size, self.seed, self.hflip = images, labels, batch_size, seed, hflip

    def batch(self, step: int, g: torch.Generator):
        idx = torch.randint(len(self.images), (self.batch_size,), generator=g)
        x = self.images[idx]
        if self.hflip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]


class _LoaderBatches:
    """An image folder streamed through a DataLoader; a resumed run starts a fresh shuffle."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int):
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self._it, self._epoch = None, 0

    def _loader(self, step: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False))

    def batch(self, step: int, g: torch.Generator):
        if self._it is None:
            self._it = self._loader(step)
        try:
            return next(self._it)
        except StopIteration:
            self._it = self._loader(step)
            return next(self._it)


def load_training_data(data: str, cfg: DiffusionTrainConfig):
    """(batches, classes, image_size, channels, default_resolution, description)."""
    if data == "digits":
        from ..data.digits import DigitsDataset

        if cfg.class_list:
            raise SyncoError("class_list cannot be used with the built-in digits (always the classes 0-9).")
        size = cfg.image_size or 8
        channels = cfg.channels or 1
        ds = DigitsDataset("train", image_size=size)
        x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        if channels == 1:
            x = x[:, :1]
        y = torch.tensor(ds.targets, dtype=torch.long)
        batches = _TensorBatches(x.contiguous(), y, cfg.batch_size, cfg.seed, cfg.hflip)
        return batches, list(ds.classes), size, channels, cfg.resolution or 16, f"digits train ({len(ds)} images)"
    from torchvision.transforms import v2

    from ..data.build import build_dataset

    path = Path(data)
    if not path.exists():
        raise SyncoError(f"--data '{data}' is neither 'digits' nor an existing directory. Give an image folder "
                         "(root/<class>/<image>, or root/train/<class>/<image>) or 'digits'.")
    size = cfg.image_size or 32
    channels = cfg.channels or 3
    steps = [v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if channels == 1:
        steps.append(v2.Grayscale(1))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * channels, [0.5] * channels)]
    ds = build_dataset("folder", root=path, split="train", transform=v2.Compose(steps), class_list=cfg.class_list)
    if len(ds) < cfg.batch_size:
        raise SyncoError(f"the image folder '{data}' has {len(ds)} images, fewer than batch_size={cfg.batch_size}. "
                         "Lower batch_size.")
    batches = _LoaderBatches(ds, cfg.batch_size, cfg.seed, cfg.num_workers)
    return batches, list(ds.classes), size, channels, cfg.resolution or size, f"image folder {data} ({len(ds)} images)"


# ---------------------------------------------------------------------------------------------
# Training


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 17) % 2**63)


def _config_diff(saved: dict, cfg: DiffusionTrainConfig) -> list[str]:
    now = asdict(cfg)
    return [k for k in now if k not in RESUMABLE_KEYS and saved.get(k) != now[k]]


def train_diffusion(data: str, out, cfg: Optional[DiffusionTrainConfig] = None, progress: bool = True) -> dict:
    """Train a class-conditional diffusion model on ``data`` ('digits' or an image folder) into ``out``.

    A killed run resumes from ``out/train_state.pt`` (saved every ``ckpt_every`` steps; removed once the model
    is written); a finished one is refused (choose a new ``out``).
    Returns a summary dict (also in ``synco_diffusion.json``).
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from ..io import atomic_save, load_torch_file

    cfg = cfg or DiffusionTrainConfig()
    validate_train_config(cfg)
    out = Path(out)
    if (out / MODEL_FILE).exists():
        raise SyncoError(f"'{out}' already holds a trained model ({MODEL_FILE}). Choose a new --out, or delete "
                         "the directory to train again.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    amp = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    batches, classes, size, channels, resolution, described = load_training_data(data, cfg)
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, size, channels, len(classes)).to(device)
    scheduler = build_noise_scheduler(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps), cfg.steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    ema.to(device)
    step, seconds_before, loss_avg = 0, 0.0, float("nan")
    state_path = out / STATE_FILE
    if state_path.exists():
        state = load_torch_file(state_path)
        diff = _config_diff(state["config"], cfg)
        if diff or state["data"] != data:
            what = ", ".join(diff) if diff else "--data"
            raise SyncoError(f"'{out}' holds an unfinished training run with different settings ({what}). Use the "
                             f"same settings to resume it, or a new --out.")
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        ema.to(device)
        step, seconds_before = int(state["step"]), float(state.get("seconds", 0.0))
        loss_avg = float(state.get("loss", float("nan")))
        print(f"synco: resuming diffusion training in {out} at step {step}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"synco: training a {n_params / 1e6:.2f}M-parameter class-conditional UNet ({len(classes)} classes, "
          f"{channels}x{size}x{size}) on {described} for {cfg.steps} steps on {device}", file=sys.stderr)

    def save_state():
        atomic_save({"unet": unet.state_dict(), "optimizer": opt.state_dict(),
                          "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict(), "step": step,
                          "seconds": seconds_before + time.perf_counter() - t0, "config": asdict(cfg),
                          "data": data, "loss": loss_avg}, state_path)

    log_path = out / "train_log.jsonl"
    if log_path.exists():  # drop what a killed run logged after its last saved state
        keep = [line for line in log_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in keep))
    bar = tqdm(total=cfg.steps, initial=step, desc="diffusion", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    loss_sum, loss_n = 0.0, 0
    unet.train()
    while step < cfg.steps:
        g = _step_generator(cfg.seed, step)
        x, y = batches.batch(step, g)
        b = x.shape[0]
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        drop = torch.rand(b, generator=g) < cfg.p_uncond
        y = torch.where(drop, torch.full_like(y, len(classes)), y)
        x, noise, t, y = x.to(device), noise.to(device), t.to(device), y.to(device)
        noisy = scheduler.add_noise(x, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = unet(noisy, t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        if not torch.isfinite(loss):
            raise SyncoError(f"the diffusion loss became {loss.item()} at step {step}; lower lr "
                             f"(now {cfg.lr}).")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        step += 1
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_avg = loss_sum / loss_n
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_avg, "lr": lr_sched.get_last_lr()[0],
                                    "seconds": seconds_before + time.perf_counter() - t0}) + "\n")
            loss_sum, loss_n = 0.0, 0
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            save_state()
    bar.close()
    seconds = seconds_before + time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0  # this process only: tells a busy machine from a slow model
    save_state()  # a kill while the model is being written resumes here and only writes it

    ema.copy_to(unet.parameters())  # the saved model carries the EMA weights
    unet.eval()
    meta = {"format": FORMAT, "version": 1, "classes": classes, "null_class": len(classes),
            "image_size": size, "channels": channels, "resolution": resolution, "data": data,
            "sampler": cfg.sampler, "sample_steps": cfg.sample_steps, "guidance": cfg.guidance,
            "p_uncond": cfg.p_uncond, "train_steps": step, "train_seconds": round(seconds, 2),
            "train_cpu_seconds_last_run": round(cpu_seconds, 2),
            "final_loss": loss_avg, "parameters": n_params, "device": str(device), "config": asdict(cfg)}
    model = SmallDiffusion(unet, scheduler, meta, out)
    if cfg.preview:
        write_preview(model, out / "preview.png", device=device)
    save_model(model, out)
    state_path.unlink()
    print(f"synco: trained in {seconds:.1f} s ({step / max(seconds, 1e-9):.1f} steps/s), final loss "
          f"{loss_avg:.4f} -> {out}", file=sys.stderr)
    return {k: meta[k] for k in ("classes", "image_size", "channels", "train_steps", "train_seconds",
                                 "final_loss", "parameters")}


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
