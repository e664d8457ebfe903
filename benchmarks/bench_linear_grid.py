"""Time the one-pass learning-rate grid of `synco eval linear` against a single head.

    python benchmarks/bench_linear_grid.py                       # cpu-demo backbone, digits, 2 epochs
    python benchmarks/bench_linear_grid.py --checkpoint runs/x --device cuda --epochs 5 --dataset folder --root DIR

Runs the whole probe (held-out/test feature extraction, ``--epochs`` augmented epochs, per-epoch
evaluation) ``--repeats`` times with the paper's 6-value grid and with one learning rate, on the
same data, seeds and batches, and prints a Markdown table with the median wall time of each and the
ratio of the medians. Training the six heads one after another would cost about six single runs;
the one-pass grid shares every backbone forward, so its ratio stays close to 1.
``--cache-features`` times the cached-features mode instead (heads only: the ratio is larger there,
but both times are small).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from synco.eval import linear as L
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synco.eval import linear as L

from synco.eval.common import EvalOptions, eval_image_size, load_eval_backbone, resolve_device


def time_probe(lrs: list, args, data, backbone, meta, device, size) -> float:
    hp = L.LinearHParams(epochs=args.epochs, warmup_epochs=min(1, args.epochs - 1), lrs=lrs,
                         val_fraction=args.val_fraction, cache_features=args.cache_features, resume=False)
    with tempfile.TemporaryDirectory() as out:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        L.linear_probe(backbone, meta, data, Path(out), hp, batch_size=args.batch_size, num_workers=args.num_workers,
                       seed=0, device=device, image_size=size, checkpoint=args.checkpoint, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="random")
    p.add_argument("--backbone", default="cpu-demo", help="for --checkpoint random (timm or synco preset name)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--cache-features", action="store_true")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    opts = EvalOptions(dataset=args.dataset, root=args.root, device=args.device, num_workers=args.num_workers,
                       backbone=args.backbone if args.checkpoint == "random" else None)
    device = resolve_device(opts.device)
    backbone, meta = load_eval_backbone(args.checkpoint, opts, device)
    size = eval_image_size(opts, backbone)
    data = L.probe_data(opts, size, [0.08, 1.0])

    grid, single = list(L.PAPER_LRS), [1.0]
    time_probe(single, args, data, backbone, meta, device, size)  # warm-up (allocations, imports)
    times = {"grid": [], "single": []}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both alike
        times["grid"].append(time_probe(grid, args, data, backbone, meta, device, size))
        times["single"].append(time_probe(single, args, data, backbone, meta, device, size))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["grid"] / med["single"]
    mode = "cached features" if args.cache_features else "augmented every epoch"
    print(f"linear probe, {meta['backbone']} ({args.checkpoint}) on {args.dataset}: {len(data.train_aug)} train images, "
          f"{args.epochs} epochs, batch {args.batch_size}, {mode}, {device}, median of {args.repeats}\n")
    print("| heads | learning rates | median time (s) | vs one head |")
    print("|---|---|---|---|")
    print(f"| 1 | {single} | {med['single']:.2f} | 1.00x |")
    print(f"| {len(grid)} (one pass) | {grid} | {med['grid']:.2f} | {ratio:.2f}x |")
    print(f"| {len(grid)} (one run each, estimated) | {grid} | {len(grid) * med['single']:.2f} | {len(grid):.2f}x |")
    result = {"median_s": med, "times_s": times, "ratio": ratio, "epochs": args.epochs, "mode": mode,
              "device": str(device), "n_train": len(data.train_aug)}
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
