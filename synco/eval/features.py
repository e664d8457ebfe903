"""Running a frozen model over a dataset: sharded across processes under torchrun (no padding, so no
sample is duplicated or dropped) and gathered back in dataset order on every process."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..engine import dist, signals
from ..errors import SyncoError


class ShardSampler(torch.utils.data.Sampler):
    """Every rank takes indices rank, rank+W, ... in order: no padding, so nothing is duplicated."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def feature_loader(dataset, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    sampler = ShardSampler(len(dataset), dist.rank(), dist.world_size()) if dist.world_size() > 1 else None
    # Workers ignore SIGTERM/SIGINT as the training loader's do: the main process handles them, so a scheduler
    # signalling the whole process group during the k-NN monitor still gets a checkpoint, not a worker crash.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=signals.ignore_in_worker if num_workers else None)


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int, num_workers: int,
            device: torch.device, desc: str = "features", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(images)`` (e.g. backbone features or logits, float32, not normalised) and labels of every
    sample, in dataset order. Under torchrun each process computes a shard (``feature_loader``) and
    the shards are gathered in order on every process."""
    loader = feature_loader(dataset, max(1, batch_size // dist.world_size()), num_workers)
    outs, labels = [], []
    bf16 = device.type == "cuda"
    for x, y in tqdm(loader, desc=desc, disable=not progress or not dist.is_main(), leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fn(x.to(device, non_blocking=True))
        outs.append(out.float())
        labels.append(torch.as_tensor(y).to(device))
    if not outs:
        raise SyncoError("a dataset split is empty: nothing to evaluate.")
    f, y = torch.cat(outs), torch.cat(labels)
    if dist.world_size() > 1:
        idx = torch.as_tensor(loader.sampler.indices, device=device)
        f, y, idx = dist.all_gather_varsize(f), dist.all_gather_varsize(y), dist.all_gather_varsize(idx)
        perm = torch.argsort(idx)
        f, y = f[perm], y[perm]
    return f, y


def extract_features(model: torch.nn.Module, loader_or_dataset, device: torch.device | str, desc: str = "features",
                     progress: bool = True, batch_size: int = 256, num_workers: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 features of a model in eval mode, and labels, in dataset order."""
    model.eval()
    dataset = getattr(loader_or_dataset, "dataset", loader_or_dataset)
    if isinstance(loader_or_dataset, DataLoader):
        batch_size, num_workers = loader_or_dataset.batch_size * dist.world_size(), loader_or_dataset.num_workers
    f, y = predict(model, dataset, batch_size, num_workers, torch.device(device), desc, progress)
    return F.normalize(f, dim=1), y
