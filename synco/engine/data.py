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


class MixedSampler(DistributedSampler):
    """A DistributedSampler over ConcatDataset([real, synthetic]) drawing, each epoch, a fresh random
    subset of each source in the configured proportion (synthetic drawn with replacement only if it is
    smaller than needed), shuffled together, then sharded across processes as DistributedSampler does."""

    def __init__(self, dataset: ConcatDataset, n_real: int, n_syn: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.sizes = [len(d) for d in dataset.datasets]
        self.counts = (n_real, n_syn)
        total = n_real + n_syn
        self.num_samples = total // self.num_replicas  # drop_last semantics
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        (n_real_all, n_syn_all), (n_real, n_syn) = self.sizes, self.counts
        real = torch.randperm(n_real_all, generator=g)[:n_real]
        if n_syn <= n_syn_all:
            syn = torch.randperm(n_syn_all, generator=g)[:n_syn]
        else:
            syn = torch.randint(n_syn_all, (n_syn,), generator=g)
        idx = torch.cat([real, syn + n_real_all])
        idx = idx[torch.randperm(len(idx), generator=g)][: self.total_size]
        return iter(idx[self.rank: self.total_size: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


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
            self.synthetic = SafeImageFolder(d.synthetic_root, transform=views, bad_image_log=bad_image_log)
            n_real, n_syn = mix_counts(len(self.real), d.synthetic_ratio, d.synthetic_mode)
        self.counts = (n_real, n_syn)
        self.epoch_size = n_real + n_syn
        common = dict(num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        if self.synthetic is None:
            self.dataset = self.real
            self.sampler = DistributedSampler(self.real, **common)
        else:
            self.dataset = ConcatDataset([self.real, self.synthetic])
            self.sampler = MixedSampler(self.dataset, n_real, n_syn, **common)
        self.samples_per_rank = len(self.sampler)

    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        self.sampler.set_epoch(epoch)
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
