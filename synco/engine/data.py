"""Pretraining data: two BYOL views per image, sharded across processes, optionally mixed with a
synthetic (Syn2Co) image folder at a fixed per-epoch ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from ..data.build import build_dataset
from ..data.folder import SafeImageFolder, count_bad_images
from ..data.transforms import TwoViews, byol_transforms
from ..errors import SyncoError


def mix_counts(n_real: int, ratio: float, mode: str) -> tuple[int, int]:
    """(real, synthetic) images per epoch. replace: epoch size stays |real|, a fraction ``ratio`` of it
    synthetic. add: every real image plus as many synthetic ones as make that fraction ``ratio``."""
    if ratio <= 0:
        return n_real, 0
    if mode == "replace":
        n_syn = int(round(ratio * n_real))
        return n_real - n_syn, n_syn
    if ratio >= 1:
        raise SyncoError("data.synthetic_mode=add needs data.synthetic_ratio < 1 (1 means synthetic only: use replace).")
    return n_real, int(round(n_real * ratio / (1 - ratio)))


class GlobalBatchSampler(DistributedSampler):
    """A DistributedSampler whose every global batch is a contiguous run of one epoch-wide permutation,
    rank r taking the r-th block of it. All-gathering the ranks' keys then gives the same queue content,
    in the same order, for any number of processes with the same global batch; resuming with another
    number of processes continues the same data order.

    With ``counts=(n_real, n_synthetic)`` over ConcatDataset([real, synthetic]) each epoch draws a fresh
    random subset of each source in that proportion (synthetic with replacement only if it is smaller than
    needed), shuffled together.
    """

    def __init__(self, dataset, batch_size: int, counts: tuple[int, int] | None = None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size
        self.counts = counts
        total = sum(counts) if counts else len(dataset)
        self.global_batch = batch_size * self.num_replicas
        self.total_size = total // self.global_batch * self.global_batch
        self.num_samples = self.total_size // self.num_replicas

    def epoch_indices(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.counts is None:
            return torch.randperm(len(self.dataset), generator=g)
        (n_real_all, n_syn_all), (n_real, n_syn) = [len(d) for d in self.dataset.datasets], self.counts
        real = torch.randperm(n_real_all, generator=g)[:n_real]
        if n_syn <= n_syn_all:
            syn = torch.randperm(n_syn_all, generator=g)[:n_syn]
        else:
            syn = torch.randint(n_syn_all, (n_syn,), generator=g)
        idx = torch.cat([real, syn + n_real_all])
        return idx[torch.randperm(len(idx), generator=g)]

    def __iter__(self):
        idx = self.epoch_indices()[: self.total_size].view(-1, self.num_replicas, self.batch_size)
        return iter(idx[:, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_samples


class IndexSeeded(torch.utils.data.Dataset):
    """Draw each sample's augmentation from a stream keyed by (seed, epoch, index), not by the process:
    the same image gets the same views whichever rank or worker loads it, and after any resume."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 1_000_033 + int(i)) % 2**63)
            return self.dataset[i]


class _Skip(torch.utils.data.Sampler):
    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.n):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(len(self.sampler) - self.n, 0)


class PretrainData:
    def __init__(self, cfg, dist, bad_image_log: Optional[Path] = None):
        d = cfg.data
        self.cfg, self.bad_image_log = cfg, bad_image_log
        t1, t2 = byol_transforms(d.image_size, crop_scale=tuple(d.crop_scale))
        views = TwoViews(t1, t2)
        self.real = build_dataset(d.dataset, root=d.root, split="train", transform=views, class_list=d.class_list,
                                  image_size=d.image_size, bad_image_log=bad_image_log)
        if d.max_images and d.max_images < len(self.real):
            keep = torch.randperm(len(self.real), generator=torch.Generator().manual_seed(cfg.seed))[: d.max_images]
            self.real = torch.utils.data.Subset(self.real, keep.sort().values.tolist())
        self.synthetic = None
        n_real, n_syn = len(self.real), 0
        if d.synthetic_root and d.synthetic_ratio > 0:
            if not Path(d.synthetic_root).is_dir():
                raise SyncoError(f"data.synthetic_root '{d.synthetic_root}' does not exist. Make a synthetic clone "
                                 "first, e.g. `synco synth-data train --data digits --out runs/ddpm-digits` then "
                                 "`synco synth-data generate --model runs/ddpm-digits --classes all --per-class 150 "
                                 f"--out {d.synthetic_root}`.")
            self.synthetic = SafeImageFolder(d.synthetic_root, transform=views, bad_image_log=bad_image_log)
            n_real, n_syn = mix_counts(len(self.real), d.synthetic_ratio, d.synthetic_mode)
        self.counts = (n_real, n_syn)
        self.epoch_size = n_real + n_syn
        common = dict(num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        if self.synthetic is None:
            self.dataset = IndexSeeded(self.real, cfg.seed)
            self.sampler = GlobalBatchSampler(self.dataset, cfg.optim.batch_size, **common)
        else:
            self.dataset = IndexSeeded(ConcatDataset([self.real, self.synthetic]), cfg.seed)
            self.sampler = GlobalBatchSampler(self.dataset.dataset, cfg.optim.batch_size, counts=self.counts,
                                              **common)
        self.samples_per_rank = len(self.sampler)

    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch
        sampler = _Skip(self.sampler, skip_batches * self.cfg.optim.batch_size) if skip_batches else self.sampler
        workers = self.cfg.data.num_workers
        return DataLoader(self.dataset, batch_size=self.cfg.optim.batch_size, sampler=sampler, drop_last=True,
                          num_workers=workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False, prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))

    def bad_images(self) -> int:
        return count_bad_images(self.bad_image_log) if self.bad_image_log else 0


def build_pretrain_data(cfg, dist, bad_image_log: Optional[Path] = None) -> PretrainData:
    return PretrainData(cfg, dist, bad_image_log)
