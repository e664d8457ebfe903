"""Throughput of the two BYOL views: batched on the device (BatchViews) against per image in the DataLoader.

    python benchmarks/bench_augment.py                        # digits at 16 and 64 px, CPU, 1 thread
    python benchmarks/bench_augment.py --sizes 64 224 --device cuda --batch-size 256

Three ways to make both views of ``--images`` digits images, interleaved ``--repeats`` times so that load changes
on a shared machine hit all alike, median img/s of each:

- ``per-image``: DataLoader over DigitsDataset with ``TwoViews(byol_transforms(size))`` (today's path; the
  loader runs ``--workers`` worker processes, 0 = in this process, which is the per-core cost);
- ``batch+loader``: the training path: DataLoader batches of the same images as uint8 tensors (one lookup per
  batch, ``InMemoryBatches``), then ``BatchViews`` on the batch;
- ``batch only``: ``BatchViews`` on a batch already in memory (the augmentation itself).

Both paths use the default ``data.augment`` (Table 11). The ratio column is per repeat (paired), then the median.
The last column divides by this process's CPU time instead of wall time: on a machine shared with other jobs it
is the steadier number (with ``--workers 0``; it leaves out worker processes and GPU time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

try:
    from synco.data.batch_augment import BatchViews, sample_seeds
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synco.data.batch_augment import BatchViews, sample_seeds

from synco.config import AugmentConfig
from synco.data.digits import DigitsDataset
from synco.data.transforms import TwoViews, byol_transforms, view_params
from synco.engine.data import InMemoryBatches


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_per_image(ds, n, batch, workers) -> float:
    sub = torch.utils.data.Subset(ds, range(n))
    loader = DataLoader(sub, batch_size=batch, num_workers=workers, drop_last=False)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in loader:
        pass
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def _as_is(batch):
    return batch


def time_batch_loader(raw, views, n, batch, workers, device, epoch) -> float:
    """The training path: a batch of uint8 images per lookup (``InMemoryBatches``), then both views."""
    loader = DataLoader(raw, batch_size=batch, sampler=[(epoch, i) for i in range(n)], num_workers=workers,
                        drop_last=False, collate_fn=_as_is)
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for (imgs, idx), _ in loader:
        x1, x2 = views(imgs.to(device, non_blocking=True), sample_seeds(0, epoch, idx))
    _sync(device)
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def time_batch_only(images, views, device, epoch) -> float:
    seeds = sample_seeds(0, epoch, torch.arange(len(images)))
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    x1, x2 = views(images, seeds)
    _sync(device)
    return len(images) / (time.perf_counter() - start), len(images) / (time.process_time() - cpu)


def bench_size(size: int, args, device) -> dict:
    cfg = AugmentConfig()
    per_image = DigitsDataset("train", transform=TwoViews(*byol_transforms(size, views=view_params(cfg))),
                              image_size=size)
    raw = InMemoryBatches(*per_image.as_tensors())
    views = BatchViews.from_config(cfg, size).to(device)
    n = min(args.images, len(raw))
    batch_in_memory = raw.images[: args.batch_size].to(device)
    # warm-up (allocations, first-call dispatch, kernel caches)
    time_per_image(per_image, min(n, args.batch_size), args.batch_size, args.workers)
    time_batch_loader(raw, views, min(n, args.batch_size), args.batch_size, args.workers, device, 0)
    time_batch_only(batch_in_memory, views, device, 0)
    rates = {"per-image": [], "batch+loader": [], "batch only": []}
    cpu = {k: [] for k in rates}
    for r in range(args.repeats):
        runs = {"per-image": lambda: time_per_image(per_image, n, args.batch_size, args.workers),
                "batch+loader": lambda: time_batch_loader(raw, views, n, args.batch_size, args.workers, device,
                                                          r + 1),
                "batch only": lambda: time_batch_only(batch_in_memory, views, device, r + 1)}
        for k, run in runs.items():
            wall, proc = run()
            rates[k].append(wall)
            cpu[k].append(proc)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(v, rates["per-image"])) for k, v in rates.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"size": size, "images": n, "median_img_s": med, "paired_ratio": ratio, "img_s": rates,
            "median_img_per_cpu_s": med_cpu, "img_per_cpu_s": cpu}


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--images", type=int, default=512, help="images per timed pass (digits train has 1437)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of both loader paths")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [bench_size(s, args, device) for s in args.sizes]
    print(f"BYOL two views, digits, batch {args.batch_size}, {args.images} images per pass, {device}, "
          f"{torch.get_num_threads()} thread(s), {args.workers} loader worker(s), median of {args.repeats}\n")
    print("| size | path | img/s (median) | vs per-image (paired median) | img per CPU-second of this process |")
    print("|---|---|---|---|---|")
    for r in results:
        for k, v in r["median_img_s"].items():
            print(f"| {r['size']} | {k} | {v:.0f} | {r['paired_ratio'][k]:.2f}x | "
                  f"{r['median_img_per_cpu_s'][k]:.0f} |")
    if args.json:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
