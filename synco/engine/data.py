"""Pretraining data: two BYOL views per image, sharded across processes, optionally mixed with a
synthetic (Syn2Co) image folder at a fixed per-epoch ratio.

``data.augment.on`` picks where the views are made: ``workers`` runs the per-image torchvision pipeline in
DataLoader workers; ``device`` has the workers only decode to uint8 tensors of one size and makes both views of
the whole batch on the training device (:class:`synco.data.batch_augment.BatchViews`). Either way each image's
views are drawn from a stream keyed by (seed, epoch, dataset index), so any number of processes and any resume
give the same views. Workers persist across epochs: the sampler hands them (epoch, index) pairs."""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Subset

from ..data.batch_augment import BatchViews, normalize, sample_seeds
from ..data.build import create_dataset
from ..data.crops import PerImageViews, ViewCrops, image_size
from ..data.folder import SafeImageFolder, UnreadableImage, count_bad_images
from ..data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, view_params
from ..errors import SyncoError
from . import signals

logger = logging.getLogger("synco.data")


SHM = Path("/dev/shm")


def prefetch_factor(workers: int, batch_bytes: int, shm: Path = SHM) -> Optional[int]:
    """Batches each worker keeps ready: 2 (torch's default; the workers make views of a whole batch ahead), fewer
    when the batches in flight would not fit the free shared memory they pass through (Docker gives a container
    64 MB of /dev/shm unless told ``--shm-size``), and an error when one batch per worker does not fit."""
    if workers == 0:
        return None
    try:
        # every process of the node passes its batches through the same /dev/shm: this one's share
        free = shutil.disk_usage(shm).free / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except (OSError, ValueError):  # no /dev/shm (macOS, Windows): torch shares memory another way
        return 2
    for prefetch in (2, 1):  # half the free space at most: torch's own queues and other jobs share it
        if workers * prefetch * batch_bytes <= free / 2:
            if prefetch == 1:
                logger.warning("data loading: each of %d workers keeps 1 batch ready, not 2: 2 batches of %.0f MB "
                               "each would not fit the %.0f MB free in %s (give the container more shared memory, "
                               "e.g. docker run --shm-size=8g)", workers, batch_bytes / 2**20, free / 2**20, shm)
            return prefetch
    raise SyncoError(f"data loading: {workers} DataLoader workers pass their batches ({batch_bytes / 2**20:.0f} MB "
                     f"each) through shared memory, but {shm} has {free / 2**20:.0f} MB free per process of this "
                     "node. Give the container "
                     "more (docker run --shm-size=8g, or a larger /dev/shm), or lower data.num_workers or "
                     "optim.batch_size.")


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


def resolve_index(dataset, i: int):
    """``(the dataset that holds sample i, its index there)``, through ``Subset`` and ``ConcatDataset``."""
    while True:
        if isinstance(dataset, Subset):
            dataset, i = dataset.dataset, dataset.indices[i]
        elif isinstance(dataset, ConcatDataset):
            k = bisect.bisect_right(dataset.cumulative_sizes, i)
            dataset, i = dataset.datasets[k], i - (dataset.cumulative_sizes[k - 1] if k else 0)
        else:
            return dataset, i


class IndexSeeded(torch.utils.data.Dataset):
    """Both views of sample ``(epoch, i)`` as ``((uint8 [2, 3, S, S], i), label)``, made by ``views(image, seed)``
    (:class:`~synco.data.crops.ViewCrops` or :class:`~synco.data.crops.PerImageViews`) with the sample's seed
    ``sample_seeds(seed, epoch, i)``: the same image gets the same views whichever rank or worker loads it, and
    after any resume. The datasets under it (through ``Subset`` and ``ConcatDataset``) provide
    ``sample(index, transform)``, which skips unreadable images."""

    def __init__(self, dataset, seed: int, views: Callable):
        self.dataset, self.seed, self.views = dataset, seed, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        seed = int(sample_seeds(self.seed, epoch, [i])[0])
        base, j = resolve_index(self.dataset, int(i))
        pair, label = base.sample(j, lambda image: self.views(image, seed))
        return (pair, int(i)), label

    # Headers read ahead of their decode: each holds its file open until then, so at most this many at a time.
    OPEN_AHEAD = 64

    def __getitems__(self, keys: list) -> list:
        """A batch of :meth:`__getitem__` (what the DataLoader asks of a worker), with the seeds and crop boxes of
        ``OPEN_AHEAD`` images at a time drawn in one vectorised pass: their headers are read first, for the sizes."""
        if len(keys) > self.OPEN_AHEAD:
            return [item for k in range(0, len(keys), self.OPEN_AHEAD)
                    for item in self.__getitems__(keys[k:k + self.OPEN_AHEAD])]
        epochs = {e for e, _ in keys}
        if len(epochs) != 1:
            return [self[key] for key in keys]
        index = [int(i) for _, i in keys]
        seeds = sample_seeds(self.seed, epochs.pop(), index)
        opened = [base.sample(j) for base, j in (resolve_index(self.dataset, i) for i in index)]
        height, width = (torch.tensor(n) for n in zip(*(image_size(image) for image, _ in opened)))
        boxes = self.views.boxes(seeds, height, width)
        out = []
        for key, i, seed, box, (image, label) in zip(keys, index, seeds.tolist(), boxes, opened):
            try:
                out.append(((self.views(image, seed, box), i), label))
            except UnreadableImage:  # the pixels behind a good header: the per-item path skips it as a bad image
                out.append(self[key])
        return out


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
        self.device_views: Optional[BatchViews] = None
        self._mean_std: Optional[list] = None
        views = (ViewCrops if self.on_device else PerImageViews)(d.image_size, view_params(d.augment))
        self.real = create_dataset(d.dataset, root=d.root, split="train", class_list=d.class_list,
                                   image_size=d.image_size, bad_image_log=bad_image_log, lazy=True)
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
            self.synthetic = SafeImageFolder(d.synthetic_root, bad_image_log=bad_image_log, lazy=True)
            n_real, n_syn = mix_counts(len(self.real), d.synthetic_ratio, d.synthetic_mode)
        self.counts = (n_real, n_syn)
        self.epoch_size = n_real + n_syn
        common = dict(num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batched = InMemoryBatches.of(self.real) if self.on_device and self.synthetic is None else None
        if self.batched is not None:
            self.dataset = self.batched
            self.sampler = GlobalBatchSampler(self.dataset, batch_size, **common)
        elif self.synthetic is None:
            self.dataset = IndexSeeded(self.real, seed, views)
            self.sampler = GlobalBatchSampler(self.dataset, batch_size, **common)
        else:
            self.dataset = IndexSeeded(ConcatDataset([self.real, self.synthetic]), seed, views)
            self.sampler = GlobalBatchSampler(self.dataset.dataset, batch_size, counts=self.counts, **common)
        self.samples_per_rank = len(self.sampler)
        self._loader: Optional[DataLoader] = None

    def batch_bytes(self) -> int:
        """Bytes of one batch out of the workers: uint8 whole images held in memory, else both views' crops."""
        side = self.data_cfg.image_size
        return self.batch_size * 3 * side * side * (1 if self.batched is not None else 2)

    def _make_loader(self, sampler, persistent: bool, epoch: int) -> DataLoader:
        workers = self.data_cfg.num_workers
        # An explicit generator: without one, starting an epoch would draw from the global RNG and shift the
        # stream of drop path and synthetic negatives differently in a resumed run.
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=workers, pin_memory=torch.cuda.is_available(),
                          collate_fn=_as_is if self.batched is not None else None,
                          persistent_workers=persistent and workers > 0,
                          prefetch_factor=prefetch_factor(workers, self.batch_bytes()),
                          # modulo 2^63: torch takes 64 bits, and seed * 7919 overflows them above seed ~2.3e15
                          generator=torch.Generator().manual_seed((self.seed * 7919 + epoch) % 2**63),
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
        """The two normalised float views ``[B, 3, S, S]`` of one loader batch ``(uint8 images, indices)``, on
        ``device``: the workers' views normalised there, or the views made there (``on=device``) from the
        workers' crops ``[B, 2, 3, S, S]`` or, for images held in memory, from the whole images ``[B, 3, S, S]``."""
        images, index = batch
        images = images.to(device, non_blocking=True)
        if not self.on_device:
            if self._mean_std is None:  # copied to the device once, not every step
                self._mean_std = [torch.tensor(v, device=device).view(1, 3, 1, 1)
                                  for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
            return normalize(images[:, 0], *self._mean_std), normalize(images[:, 1], *self._mean_std)
        if self.device_views is None:
            self.device_views = BatchViews(self.data_cfg.image_size, view_params(self.data_cfg.augment),
                                           IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).to(device)
        return self.device_views(images, sample_seeds(self.seed, epoch, index))

    def view_stream(self, first_epoch: int, skip_batches: int, epochs: int, n_batches: int,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(x1, x2, labels)`` of every remaining batch of the run, epoch after epoch: from batch ``skip_batches`` of
        ``first_epoch`` to the end of epoch ``epochs - 1``, the first ``n_batches`` batches of each epoch (what its
        optimizer steps use: a remainder short of a gradient-accumulation step is never fetched)."""
        for epoch in range(first_epoch, epochs):
            skip = skip_batches if epoch == first_epoch else 0
            for batch, labels in itertools.islice(self.loader(epoch, skip_batches=skip), n_batches - skip):
                labels = self.known_labels(batch, labels).to(device, non_blocking=True)
                yield (*self.views(batch, epoch, device), labels)

    def known_labels(self, batch, labels: torch.Tensor) -> torch.Tensor:
        """The batch's classes for diagnostics, -1 for synthetic (Syn2Co) images: their folder's class order need
        not be the real folder's."""
        if self.synthetic is None:
            return labels
        return torch.where(batch[1] >= len(self.real), -1, labels)

    def close(self) -> None:
        """Stop the persistent loader's worker processes now. They ignore SIGTERM (see
        :func:`~synco.engine.signals.ignore_in_worker`), so at exit multiprocessing could not terminate workers left
        running by an error, and the process would hang; told to finish through their queues, they exit."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def bad_images(self) -> int:
        return count_bad_images(self.bad_image_log) if self.bad_image_log else 0


def pretrain_data_kwargs(cfg, dist) -> dict:
    """:class:`PretrainData`'s arguments from a config and the process group (timm's ``x_kwargs(cfg)`` pair)."""
    return dict(data=cfg.data, batch_size=cfg.optim.batch_size, seed=cfg.seed, world_size=dist.world_size,
                rank=dist.rank)


def create_pretrain_data(cfg, dist, bad_image_log: Optional[Path] = None) -> PretrainData:
    return PretrainData(**pretrain_data_kwargs(cfg, dist), bad_image_log=bad_image_log)
