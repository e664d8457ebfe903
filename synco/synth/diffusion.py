"""Training a small class-conditional diffusion model (diffusers ``UNet2DModel`` + a DDPM noise schedule).

Training is the standard epsilon objective: noise an image with ``scheduler.add_noise`` at a random
timestep and regress the UNet's prediction onto the noise (MSE). Labels are dropped to a "null" class
with probability ``p_uncond`` so the model can also be sampled with classifier-free guidance. The result
is saved as :mod:`synco.synth.model` describes, with the EMA weights.

Every step draws its batch, noise, timesteps and label dropout from a generator seeded by (seed, step),
so a killed run resumed from ``train_state.pt`` ends with the same weights as an uninterrupted one.

On the built-in ``digits`` the model works at the digits' native 8x8 resolution, in grayscale, and
``generate`` upsamples bilinearly to ``resolution`` (16 by default, the cpu-demo size): exactly how
:class:`synco.data.digits.DigitsDataset` renders the real digits, so real and synthetic images go
through the same last step.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..device import resolve_device, use_bf16
from ..engine.metrics import trim_jsonl
from ..errors import SyncoError, key_error
from ..options import MAX_IMAGE_SIZE, MAX_THREADS, SEED_RANGE, check_options, opt
from ..resume import config_differences
from .model import FORMAT, MODEL_FILE, SAMPLERS, SmallDiffusion, save_model, write_preview

STATE_FILE = "train_state.pt"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # diffusers' DDPMScheduler


@dataclass
class DiffusionTrainConfig:
    """``synco synth-data train`` options (``key=value``)."""

    OWNER = "synth-data train option"  # how errors name a key (synco.options)

    # 0 = dataset default: 8 for digits (their native size), 32 for image folders (1..3 px: validate_train_config)
    image_size: int = opt(0, ge=0, le=MAX_IMAGE_SIZE)
    # 0 = 1 (grayscale) for digits, 3 for image folders
    channels: int = opt(0, choices=(0, 1, 3), why="1 grayscale, 3 RGB, 0 the dataset's")
    # default output size for generate; 0 = 16 for digits (cpu-demo), image_size otherwise
    resolution: int = opt(0, ge=0, le=MAX_IMAGE_SIZE)
    class_list: Optional[str] = None  # image folders: only these classes (file or shipped name)
    # The defaults are sized for the built-in digits (about 3 CPU-minutes); give image folders a bigger UNet,
    # e.g. block_out_channels=[64,128,256] attention=[false,true,true] image_size=32, and more steps.
    block_out_channels: list[int] = opt(factory=lambda: [16, 32], nonempty=True, ge=1, le=4096,
                                        why="channel counts per UNet level, e.g. [32, 64]")
    attention: list[bool] = field(default_factory=lambda: [False, True])  # self-attention per UNet level
    layers_per_block: int = opt(1, ge=1)
    norm_num_groups: int = opt(8, ge=1)  # GroupNorm's groups: divide every entry of block_out_channels
    steps: int = opt(1500, ge=1)
    batch_size: int = opt(64, ge=1, le=2**16)
    lr: float = opt(2e-3, gt=0)
    weight_decay: float = opt(0.01, ge=0)
    warmup_steps: int = opt(100, ge=0)
    ema_decay: float = opt(0.995, ge=0, lt=1)
    p_uncond: float = opt(0.1, ge=0, lt=1)  # label dropout, enables classifier-free guidance
    num_train_timesteps: int = opt(1000, ge=1)
    beta_schedule: str = opt("squaredcos_cap_v2", choices=BETA_SCHEDULES)  # diffusers' DDPMScheduler
    hflip: bool = False  # random horizontal flips (never for digits)
    sampler: str = opt("dpm", choices=tuple(SAMPLERS))  # default sampler stored with the model
    sample_steps: int = opt(20, ge=1)  # default number of sampling steps stored with the model
    # default classifier-free guidance scale stored with the model (1 = none)
    guidance: float = opt(2.0, ge=0, why="1 = no guidance")
    seed: int = opt(0, **SEED_RANGE)
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    precision: str = opt("auto", choices=("auto", "bf16", "fp32"))  # auto: bf16 on CUDA, fp32 on CPU
    # torch CPU threads; 1 is fastest for small models on a shared CPU (0 = torch default)
    threads: int = opt(1, ge=0, le=MAX_THREADS)
    num_workers: int = opt(0, ge=0, le=MAX_THREADS)  # DataLoader workers for image folders
    log_every: int = opt(50, ge=1)
    # save a resumable training state every N steps (0 = only at the end)
    ckpt_every: int = opt(500, ge=0)
    preview: bool = True  # write preview.png (samples per class) after training


# Keys that may differ when a killed training run is resumed.
RESUMABLE_KEYS = {"steps", "device", "threads", "num_workers", "log_every", "ckpt_every", "preview",
                  "sampler", "sample_steps", "guidance", "resolution"}


def validate_train_config(cfg: DiffusionTrainConfig) -> None:
    """Each field's declared bounds, then the rules between fields."""
    check_options(cfg)
    refuse = key_error(DiffusionTrainConfig.OWNER)
    if 0 < cfg.image_size < 4:
        refuse("image_size", "must be >= 4 (or 0 for the dataset default).")
    if len(cfg.attention) != len(cfg.block_out_channels):
        refuse("attention", f"needs one true/false per UNet level ({len(cfg.block_out_channels)} levels, "
                            f"from block_out_channels).")
    if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
        refuse("norm_num_groups", f"must divide every entry of block_out_channels {cfg.block_out_channels}.")
    if cfg.guidance != 1.0 and cfg.p_uncond == 0:
        refuse("guidance", "classifier-free guidance needs a model trained with p_uncond > 0.")


def create_noise_scheduler(cfg: DiffusionTrainConfig):
    """The training noise schedule (DDPM), every sampling-relevant key explicit."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=0.0001, beta_end=0.02, prediction_type="epsilon", clip_sample=True,
                         clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0,
                         variance_type="fixed_small")


def create_unet(cfg: DiffusionTrainConfig, image_size: int, channels: int, num_classes: int):
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
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**63)  # torch takes 64 bits
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

    from ..data.build import create_dataset

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
    ds = create_dataset("folder", root=path, split="train", transform=v2.Compose(steps), class_list=cfg.class_list)
    if len(ds) < cfg.batch_size:
        raise SyncoError(f"the image folder '{data}' has {len(ds)} images, fewer than batch_size={cfg.batch_size}. "
                         "Lower batch_size.")
    batches = _LoaderBatches(ds, cfg.batch_size, cfg.seed, cfg.num_workers)
    return batches, list(ds.classes), size, channels, cfg.resolution or size, f"image folder {data} ({len(ds)} images)"


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class _Training:
    """One training run in memory: the model, its optimiser, EMA and schedules, and where it stands."""

    unet: torch.nn.Module
    noise_scheduler: object  # the DDPM schedule that noises the images (saved with the model)
    opt: torch.optim.Optimizer
    lr_sched: object
    ema: object
    step: int = 0  # optimiser steps done
    seconds_before: float = 0.0  # training time spent by earlier, killed processes
    loss: float = float("nan")  # the last logged mean loss


def _setup_training(cfg: DiffusionTrainConfig, size: int, channels: int, num_classes: int,
                    device: torch.device) -> _Training:
    """A fresh UNet (initialised from ``cfg.seed``), AdamW, warm-up + cosine schedule and EMA."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(cfg.seed)
    unet = create_unet(cfg, size, channels, num_classes).to(device)
    noise_scheduler = create_noise_scheduler(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps), cfg.steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    ema.to(device)
    return _Training(unet, noise_scheduler, opt, lr_sched, ema)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 17) % 2**63)


def _train_step(run: _Training, batches, cfg: DiffusionTrainConfig, null_class: int, device: torch.device,
                amp: bool) -> float:
    """One optimiser step on batch ``run.step``; returns its loss."""
    g = _step_generator(cfg.seed, run.step)
    x, y = batches.batch(run.step, g)
    b = x.shape[0]
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, run.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
    drop = torch.rand(b, generator=g) < cfg.p_uncond
    y = torch.where(drop, torch.full_like(y, null_class), y)
    x, noise, t, y = x.to(device), noise.to(device), t.to(device), y.to(device)
    noisy = run.noise_scheduler.add_noise(x, noise, t)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        pred = run.unet(noisy, t, class_labels=y).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    if not torch.isfinite(loss):
        raise SyncoError(f"the diffusion loss became {loss.item()} at step {run.step}; lower lr "
                         f"(now {cfg.lr}).")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.unet.parameters(), 1.0)
    run.opt.step()
    run.lr_sched.step()
    run.ema.step(run.unet.parameters())
    run.step += 1
    return loss.item()


def _save_state(run: _Training, path: Path, cfg: DiffusionTrainConfig, data: str, seconds: float) -> None:
    from ..io import atomic_save

    atomic_save({"unet": run.unet.state_dict(), "optimizer": run.opt.state_dict(),
                 "lr_scheduler": run.lr_sched.state_dict(), "ema": run.ema.state_dict(), "step": run.step,
                 "seconds": seconds, "config": asdict(cfg), "data": data, "loss": run.loss}, path)


def _resume(run: _Training, path: Path, cfg: DiffusionTrainConfig, data: str, device: torch.device) -> None:
    """Continue ``run`` from the state a killed run saved, refusing one made with other settings."""
    from ..io import load_torch_file

    state = load_torch_file(path)
    diff = [d.key for d in config_differences(state["config"], asdict(cfg), RESUMABLE_KEYS)]
    if diff or state["data"] != data:
        what = ", ".join(diff) if diff else "--data"
        raise SyncoError(f"'{path.parent}' holds an unfinished training run with different settings ({what}). Use "
                         f"the same settings to resume it, or a new --out.")
    run.unet.load_state_dict(state["unet"])
    run.opt.load_state_dict(state["optimizer"])
    run.lr_sched.load_state_dict(state["lr_scheduler"])
    run.ema.load_state_dict(state["ema"])
    run.ema.to(device)
    run.step, run.seconds_before = int(state["step"]), float(state.get("seconds", 0.0))
    run.loss = float(state.get("loss", float("nan")))
    print(f"synco: resuming diffusion training in {path.parent} at step {run.step}", file=sys.stderr)


def _train_steps(run: _Training, batches, cfg: DiffusionTrainConfig, null_class: int, device: torch.device,
                 amp: bool, out: Path, data: str, seconds: Callable[[], float], progress: bool) -> None:
    """Step ``run`` up to ``cfg.steps``: the mean loss logged to ``train_log.jsonl`` every ``log_every`` steps, the
    state saved every ``ckpt_every``."""
    from tqdm.auto import tqdm

    log_path = out / "train_log.jsonl"
    trim_jsonl(log_path, run.step)
    bar = tqdm(total=cfg.steps, initial=run.step, desc="diffusion", unit="step", disable=not progress,
               dynamic_ncols=True)
    loss_sum, loss_n = 0.0, 0
    run.unet.train()
    while run.step < cfg.steps:
        loss_sum, loss_n = loss_sum + _train_step(run, batches, cfg, null_class, device, amp), loss_n + 1
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            run.loss = loss_sum / loss_n
            bar.set_postfix(loss=f"{run.loss:.4f}")
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": run.step, "loss": run.loss, "lr": run.lr_sched.get_last_lr()[0],
                                    "seconds": seconds()}) + "\n")
            loss_sum, loss_n = 0.0, 0
        if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step < cfg.steps:
            _save_state(run, out / STATE_FILE, cfg, data, seconds())
    bar.close()


def _write_model(run: _Training, meta: dict, out: Path, cfg: DiffusionTrainConfig, device: torch.device) -> None:
    run.ema.copy_to(run.unet.parameters())  # the saved model carries the EMA weights
    run.unet.eval()
    model = SmallDiffusion(run.unet, run.noise_scheduler, meta, out)
    if cfg.preview:
        write_preview(model, out / "preview.png", device=device)
    save_model(model, out)


def train_diffusion(data: str, out, cfg: Optional[DiffusionTrainConfig] = None, progress: bool = True) -> dict:
    """Train a class-conditional diffusion model on ``data`` ('digits' or an image folder) into ``out``.

    A killed run resumes from ``out/train_state.pt`` (saved every ``ckpt_every`` steps; removed once the model
    is written); a finished one is refused (choose a new ``out``).
    Returns a summary dict (also in ``synco_diffusion.json``).
    """
    from ..io import claimed_output_dir

    cfg = cfg or DiffusionTrainConfig()
    validate_train_config(cfg)
    # Checked before the data and the model are built (an unwritable --out fails at once), and locked: a second
    # train on this --out would resume the same train_state.pt.
    with claimed_output_dir(out, "synth-data train") as out:
        return _train_into(data, out, cfg, progress)


def _train_into(data: str, out: Path, cfg: DiffusionTrainConfig, progress: bool) -> dict:
    """train_diffusion's work, once ``out`` is checked and locked (under the lock, so a run that finished a moment
    ago is seen)."""
    if (out / MODEL_FILE).exists():
        raise SyncoError(f"'{out}' already holds a trained model ({MODEL_FILE}). Choose a new --out, or delete "
                         "the directory to train again.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    amp = use_bf16(cfg.precision, device)

    # -- the data and the model, resumed where a killed run with the same settings stopped
    batches, classes, size, channels, resolution, described = load_training_data(data, cfg)
    run = _setup_training(cfg, size, channels, len(classes), device)
    state_path = out / STATE_FILE
    if state_path.exists():
        _resume(run, state_path, cfg, data, device)
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in run.unet.parameters())
    print(f"synco: training a {n_params / 1e6:.2f}M-parameter class-conditional UNet ({len(classes)} classes, "
          f"{channels}x{size}x{size}) on {described} for {cfg.steps} steps on {device}", file=sys.stderr)

    # -- the steps
    t0, cpu0 = time.perf_counter(), time.process_time()

    def seconds() -> float:  # over every process of this run, killed ones included
        return run.seconds_before + time.perf_counter() - t0

    _train_steps(run, batches, cfg, len(classes), device, amp, out, data, seconds, progress)
    total_seconds = seconds()
    cpu_seconds = time.process_time() - cpu0  # this process only: tells a busy machine from a slow model
    _save_state(run, state_path, cfg, data, seconds())  # a kill while the model is written resumes here

    # -- the model, with its EMA weights; the state goes once the model is written
    meta = {"format": FORMAT, "version": 1, "classes": classes, "null_class": len(classes),
            "image_size": size, "channels": channels, "resolution": resolution, "data": data,
            "sampler": cfg.sampler, "sample_steps": cfg.sample_steps, "guidance": cfg.guidance,
            "p_uncond": cfg.p_uncond, "train_steps": run.step, "train_seconds": round(total_seconds, 2),
            "train_cpu_seconds_last_run": round(cpu_seconds, 2),
            "final_loss": run.loss, "parameters": n_params, "device": str(device), "config": asdict(cfg)}
    _write_model(run, meta, out, cfg, device)
    state_path.unlink()
    print(f"synco: trained in {total_seconds:.1f} s ({run.step / max(total_seconds, 1e-9):.1f} steps/s), final loss "
          f"{run.loss:.4f} -> {out}", file=sys.stderr)
    return {k: meta[k] for k in ("classes", "image_size", "channels", "train_steps", "train_seconds",
                                 "final_loss", "parameters")}
