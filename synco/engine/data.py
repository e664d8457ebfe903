"""Pretraining data: two BYOL views per image, sharded across processes, optionally mixed with a
synthetic (Syn2Co) image folder at a fixed per-epoch ratio.

``data.augment.on`` picks where the views are made: ``workers`` runs the per-image torchvision pipeline in
DataLoader workers; ``device`` has the workers only decode to uint8 tensors of one size and makes both views of
the whole batch on the training device (:class:`synco.data.batch_augment.BatchViews`). Either way each image's
views are drawn from a stream keyed by (seed, epoch, dataset index), so any number of processes and any resume
give the same views. Workers persist across epochs: the sampler hands them (epoch, index) pairs."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from ..data.build import build_dataset
from ..data.folder import SafeImageFolder, count_bad_images
from ..data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    TwoViews,
    byol_transforms,
    uint8_transform,
    view_params,
)
from ..errors import SyncoError
from . import signals


def mix_counts(n_real: int, ratio: float, mode: str) -> tuple[int, int]:
    """(real, synthetic) images per epoch. replace: epoch size stays |real|, a fraction ``ratio`` of it
    synthetic. add: every real image plus as many synthetic ones as make that fraction ``ratio``."""
    if ratio <= 0:
        return n_real, 0
    if mode == "replace":
        n_syn = int(round(ratio * n_real))
        return n_real - n_syn, n_syn
    if ratio >= 1:
        raise SyncoError("data.synthetic_mode=add needs data.synthetic_ratio < 1 (1 means synthetic only: use "
                         "replace).")
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
        # (epoch, index) pairs: persistent workers learn the epoch from the sampler, not from a copied attribute.
        idx = self.epoch_indices()[: self.total_size].view(-1, self.num_replicas, self.batch_size)
        return ((self.epoch, i) for i in idx[:, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_samples


class IndexSeeded(torch.utils.data.Dataset):
    """Draw each sample's augmentation from a stream keyed by (seed, epoch, index), not by the process:
    the same image gets the same views whichever rank or worker loads it, and after any resume.
    Items are looked up by ``(epoch, index)``; ``with_index`` also returns the index (device augmentation
    derives the views' seeds from it)."""

    def __init__(self, dataset, seed: int, with_index: bool = False):
        self.dataset, self.seed, self.with_index = dataset, seed, with_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if self.with_index:  # no random op in the workers: nothing to seed
            image, label = self.dataset[i]
            return (image, i), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 1_000_033 + int(i)) % 2**63)
            return self.dataset[i]


class InMemoryBatches(torch.utils.data.Dataset):
    """The device path over images held in memory as one uint8 array (the digits): the DataLoader fetches a whole
    batch in one lookup, ``((images [B, 3, S, S] uint8, indices [B]), labels [B])``, instead of B items and a
    collate (the same values: nothing random happens before the device). Keys are ``(epoch, index)``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    @staticmethod
    def of(dataset) -> Optional[InMemoryBatches]:
        """For a dataset with ``as_tensors()`` (through ``Subset``s), else None."""
        if isinstance(dataset, torch.utils.data.Subset):
            inner = InMemoryBatches.of(dataset.dataset)
            keep = torch.as_tensor(dataset.indices, dtype=torch.int64)
            return None if inner is None else InMemoryBatches(inner.images[keep], inner.targets[keep])
        return InMemoryBatches(*dataset.as_tensors()) if hasattr(dataset, "as_tensors") else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, keys: list):
        index = torch.tensor([i for _, i in keys], dtype=torch.int64)
        return (self.images[index], index), self.targets[index]

    def __getitem__(self, key: tuple[int, int]):
        (images, index), labels = self.__getitems__([key])
        return (images[0], int(index[0])), int(labels[0])


def _as_is(batch):
    return batch


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
    """The training set of one process: its sampler, a persistent loader and the two views of each batch.

    Args:
        data: the ``data`` config section (dataset, root, image size, augmentations, synthetic mix, workers).
        batch_size: images per process per micro-batch.
        seed: the run's seed (data order, the subset of ``max_images``, every view's random stream).
        world_size, rank: this process's share of each global batch.
        bad_image_log: where unreadable images are listed (they are replaced, not fatal).
    """

    def __init__(self, data, *, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 bad_image_log: Optional[Path] = None):
        d = data
        self.data_cfg, self.batch_size, self.seed, self.bad_image_log = data, batch_size, seed, bad_image_log
        self.on_device = d.augment.on == "device"
        self.device_views = None
        if self.on_device:
            views = uint8_transform(d.image_size)
        else:
            views = TwoViews(*byol_transforms(d.image_size, views=view_params(d.augment)))
        self.real = build_dataset(d.dataset, root=d.root, split="train", transform=views, class_list=d.class_list,
                                  image_size=d.image_size, bad_image_log=bad_image_log)
        if d.max_images and d.max_images < len(self.real):
            keep = torch.randperm(len(self.real), generator=torch.Generator().manual_seed(seed))[: d.max_images]
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
        common = dict(num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batched = InMemoryBatches.of(self.real) if self.on_device and self.synthetic is None else None
        if self.batched is not None:
            self.dataset = self.batched
            self.sampler = GlobalBatchSampler(self.dataset, batch_size, **common)
        elif self.synthetic is None:
            self.dataset = IndexSeeded(self.real, seed, with_index=self.on_device)
            self.sampler = GlobalBatchSampler(self.dataset, batch_size, **common)
        else:
            self.dataset = IndexSeeded(ConcatDataset([self.real, self.synthetic]), seed, with_index=self.on_device)
            self.sampler = GlobalBatchSampler(self.dataset.dataset, batch_size, counts=self.counts, **common)
        self.samples_per_rank = len(self.sampler)
        self._loader: Optional[DataLoader] = None

    def _make_loader(self, sampler, persistent: bool, epoch: int) -> DataLoader:
        workers = self.data_cfg.num_workers
        # An explicit generator: without one, starting an epoch would draw from the global RNG and shift the
        # stream of drop path and synthetic negatives differently in a resumed run.
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=workers, pin_memory=torch.cuda.is_available(),
                          collate_fn=_as_is if self.batched is not None else None,
                          persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(self.seed * 7919 + epoch),
                          worker_init_fn=signals.ignore_in_worker if workers else None)

    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """Batches of epoch ``epoch``: ``((x1, x2), labels)`` with ``on=workers``, ``((uint8, index), labels)``
        with ``on=device`` (see :meth:`views`). One persistent loader serves every whole epoch; the rest of an
        epoch cut by a resume gets a loader of its own."""
        self.sampler.set_epoch(epoch)
        if skip_batches:
            return self._make_loader(_Skip(self.sampler, skip_batches * self.batch_size), False, epoch)
        if self._loader is None:
            self._loader = self._make_loader(self.sampler, True, epoch)
        return self._loader

    def views(self, batch, epoch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of one loader batch, on ``device``."""
        if not self.on_device:
            x1, x2 = batch
            return x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        from ..data.batch_augment import BatchViews, sample_seeds

        images, index = batch
        if self.device_views is None:
            self.device_views = BatchViews(self.data_cfg.image_size, view_params(self.data_cfg.augment),
                                           IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).to(device)
        return self.device_views(images.to(device, non_blocking=True), sample_seeds(self.seed, epoch, index))

    def view_stream(self, first_epoch: int, skip_batches: int, epochs: int, n_batches: int,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The views of every remaining batch of the run, epoch after epoch: from batch ``skip_batches`` of
        ``first_epoch`` to the end of epoch ``epochs - 1``, the first ``n_batches`` batches of each epoch (what its
        optimizer steps use: a remainder short of a gradient-accumulation step is never fetched)."""
        for epoch in range(first_epoch, epochs):
            skip = skip_batches if epoch == first_epoch else 0
            for batch, _ in itertools.islice(self.loader(epoch, skip_batches=skip), n_batches - skip):
                yield self.views(batch, epoch, device)

    def bad_images(self) -> int:
        return count_bad_images(self.bad_image_log) if self.bad_image_log else 0


def pretrain_data_kwargs(cfg, dist) -> dict:
    """:class:`PretrainData`'s arguments from a config and the process group (timm's ``x_kwargs(cfg)`` pair)."""
    return dict(data=cfg.data, batch_size=cfg.optim.batch_size, seed=cfg.seed, world_size=dist.world_size,
                rank=dist.rank)


def build_pretrain_data(cfg, dist, bad_image_log: Optional[Path] = None) -> PretrainData:
    return PretrainData(**pretrain_data_kwargs(cfg, dist), bad_image_log=bad_image_log)
