"""Time synthetic hard-negative generation at the papers' setting.

    python benchmarks/bench_negatives.py --device cpu --repeats 5

Prints a Markdown table: the vectorised ``synco.negatives.SyntheticNegatives`` against a
reference with the structure of the authors' public code (types 1-4 vectorised, types 5-6 a
Python loop over slots with one autograd call each). The reference differentiates cosine
similarity like ours, so the ratio measures the implementation strategy, not the maths.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

try:
    from synco.negatives import RULES, SyntheticNegatives
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synco.negatives import RULES, SyntheticNegatives


def _inputs(device, batch, queue, dim, seed):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device)
    k = F.normalize(torch.randn(queue, dim, generator=g), dim=1).to(device)
    return q, k


def _median_ms(fn: Callable[[], object], device, repeats: int, warmup: int) -> float:
    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_negatives(
    device="cpu",
    batch=128,
    queue=4096,
    dim=256,
    n_hard=256,
    count=128,
    repeats=10,
    warmup=2,
    seed=0,
) -> float:
    """Median milliseconds of one ``SyntheticNegatives`` call with ``count`` slots of each type."""
    q, k = _inputs(device, batch, queue, dim, seed)
    gen = SyntheticNegatives(n_hard=n_hard, counts=(count,) * len(RULES))
    rng = torch.Generator(device=device).manual_seed(seed)
    return _median_ms(lambda: gen(q, k, rng), device, repeats, warmup)


def reference_negatives(
    q, queue, n_hard, count, alpha_max=0.5, beta_max=1.5, sigma=0.01, delta=0.01, eta=0.01
):
    """The authors' structure: vectorised types 1-4, a per-slot autograd loop for types 5-6."""
    batch, device = q.shape[0], q.device
    hard_idx = (q @ queue.T).topk(n_hard, dim=1, sorted=False).indices

    def pick():
        local = torch.randint(0, n_hard, (batch, count), device=device)
        return queue[hard_idx.gather(1, local)]

    def coef(low, high):
        return low + torch.rand(batch, count, 1, device=device) * (high - low)

    qs = q[:, None]
    a, n = coef(0, alpha_max), pick()
    out = [a * qs + (1 - a) * n]
    b, n = coef(1, beta_max), pick()
    out.append(n + b * (n - qs))
    g, n_i, n_j = coef(0, 1), pick(), pick()
    out.append(g * n_i + (1 - g) * n_j)
    out.append(pick() + torch.randn(batch, count, q.shape[1], device=device) * sigma)
    for step, transform in ((delta, lambda x: x), (eta, torch.sign)):
        hard = pick()
        slots = []
        for i in range(count):
            n = hard[:, i].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cosine_similarity(q, n, dim=-1).sum(), n)
            slots.append((n + step * transform(grad)).detach())
        out.append(torch.stack(slots, dim=1))
    return F.normalize(torch.cat(out, dim=1), dim=-1)


def time_reference(
    device="cpu", batch=128, queue=4096, dim=256, n_hard=256, count=128, repeats=10, warmup=2, seed=0
) -> float:
    """Median milliseconds of one ``reference_negatives`` call (same inputs as ``time_negatives``)."""
    q, k = _inputs(device, batch, queue, dim, seed)
    return _median_ms(lambda: reference_negatives(q, k, n_hard, count), device, repeats, warmup)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-hard", type=int, default=256)
    parser.add_argument("--count", type=int, default=128, help="slots per rule type")
    parser.add_argument("--ref-repeats", type=int, default=3, help="repeats for the slow reference")
    parser.add_argument("--no-reference", action="store_true", help="skip the authors'-style loop")
    args = parser.parse_args(argv)

    shape = dict(batch=args.batch, queue=args.queue, dim=args.dim, n_hard=args.n_hard, count=args.count)
    ours_ms = time_negatives(args.device, **shape, repeats=args.repeats, warmup=args.warmup)
    rows = [("vectorised (synco.negatives)", ours_ms)]
    if not args.no_reference:
        ref_ms = time_reference(args.device, **shape, repeats=args.ref_repeats, warmup=1)
        rows.append(("authors'-style loop (autograd per slot)", ref_ms))

    print(
        f"device={args.device} threads={torch.get_num_threads()} B={args.batch} K={args.queue} "
        f"C={args.dim} n_hard={args.n_hard} slots={len(RULES) * args.count} repeats={args.repeats}\n"
    )
    print("| implementation | median ms | vs vectorised |")
    print("|---|---:|---:|")
    base = rows[0][1]
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
