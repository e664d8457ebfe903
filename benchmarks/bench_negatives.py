"""Time synthetic hard-negative generation at the papers' setting, and how it grows with S and B.

    python benchmarks/bench_negatives.py --device cpu --repeats 5

Prints Markdown tables, all from one run:

1. the papers' setting (B=128 queries per GPU, K=4096, C=256, n_hard=256, 6 x 128 slots): the
   vectorised ``synco.negatives.SyntheticNegatives``, which keeps its buffers between calls, against
   (a) the same maths on fresh arrays every call, as it was before (``fresh_negatives``; the two are
   timed alternately and their outputs are checked bit for bit equal), and (b) a reference with the
   structure of the authors' public code (types 1-4 vectorised, types 5-6 a Python loop over slots with
   one autograd call each; it differentiates cosine similarity like ours, so the ratio measures the
   implementation strategy, not the maths);
2. time and page faults per call against S (slots) and against B (queries), with the exponent of a
   least-squares fit of log time on log size: 1 is linear. On CPU, fresh arrays above glibc's mmap
   threshold are faulted in again on every call, which makes them grow faster than linearly.
"""

from __future__ import annotations

import argparse
import math
import resource
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


def fresh_negatives(gen: SyntheticNegatives, q, queue, generator=None):
    """``gen(q, queue, generator)`` as it was before the generator kept its buffers (main 8fd4217): the
    same maths and draws on fresh arrays every call (the same bits; tests/test_negatives.py checks it)."""

    def grad(q, n):
        q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12)
        n_norm = torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min(1e-12)
        dot = torch.linalg.vecdot(q, n, dim=-1).unsqueeze(-1)
        return torch.addcmul(q, dot / n_norm**2, n, value=-1) / (q_norm * n_norm)

    batch, channels = q.shape
    device = q.device
    q32, queue32 = q.float(), queue.float()
    hard_idx = (q32 @ queue32.T).topk(gen.n_hard, dim=1, sorted=False).indices
    qr = q32.unsqueeze(1)
    out = torch.empty((batch, gen.num_synthetic, channels), device=device)
    for t, span in enumerate(gen.slices.values()):
        shape = (batch, span.stop - span.start)
        if not shape[1]:
            continue

        def hard():
            pick = torch.randint(gen.n_hard, shape, generator=generator, device=device)
            return queue32.index_select(0, hard_idx.gather(1, pick).reshape(-1)).view(*shape, channels)

        def uniform(low, high):
            u = torch.rand((*shape, 1), generator=generator, device=device, dtype=torch.float32)
            return u * (high - low) + low

        if t == 0:
            n = hard()
            raw = torch.lerp(n, qr, uniform(0.0, gen.alpha_max))
        elif t == 1:
            n = hard()
            raw = torch.lerp(qr, n, 1 + uniform(1.0, gen.beta_max))
        elif t == 2:
            n_i, n_j = hard(), hard()
            raw = torch.lerp(n_j, n_i, uniform(0.0, 1.0))
        elif t == 3:
            n = hard()
            noise = torch.randn((*shape, channels), generator=generator, device=device, dtype=torch.float32)
            raw = n + noise * gen.sigma
        elif t == 4:
            n = hard()
            raw = torch.add(n, grad(qr, n), alpha=gen.delta)
        else:
            n = hard()
            raw = torch.add(n, torch.sign(grad(qr, n)), alpha=gen.eta)
        out[:, span] = raw
    out.div_(torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min_(1e-12))
    return out.to(q.dtype)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_kept_vs_fresh(device="cpu", batch=128, queue=4096, dim=256, n_hard=256, counts=(128,) * 6,
                       repeats=5, warmup=1, seed=0) -> dict:
    """Median ms and page faults per call of the kept-buffer generator and of ``fresh_negatives``, timed
    alternately on the same inputs (two calls per round, as a training step makes: one per view)."""
    q, k = _inputs(device, batch, queue, dim, seed)
    gen = SyntheticNegatives(n_hard=n_hard, counts=counts)
    impls = {"kept": gen, "fresh": lambda q, k, g: fresh_negatives(gen, q, k, g)}
    rngs = {name: torch.Generator(device=device).manual_seed(seed) for name in impls}
    times = {name: [] for name in impls}
    faults = {name: [] for name in impls}
    cuda = torch.device(device).type == "cuda"
    for i in range(warmup + repeats):
        outs = {}
        for name, fn in impls.items():
            if cuda:
                torch.cuda.synchronize(device)
            f0, t0 = _faults(), time.perf_counter()
            outs[name] = (fn(q, k, rngs[name]), fn(q, k, rngs[name]))
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3 / 2)
                faults[name].append((_faults() - f0) / 2)
        if not all(torch.equal(a, b) for a, b in zip(outs["kept"], outs["fresh"])):
            raise AssertionError("kept-buffer and fresh-array outputs differ")
        del outs
    return {name: {"ms": statistics.median(times[name]), "faults": statistics.median(faults[name])}
            for name in impls}


def loglog_exponent(sizes, times) -> float:
    """Slope of the least-squares line through (log size, log time): 1 means linear growth."""
    x = [math.log(s) for s in sizes]
    y = [math.log(t) for t in times]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def scaling(device, vary: str, values, base: dict, repeats: int, warmup: int = 1) -> list[dict]:
    """Kept vs fresh at each value of ``vary`` ("count": slots per rule, so S = 6 x count; or "batch")."""
    rows = []
    for v in values:
        shape = dict(base, **{vary: v})
        count = shape.pop("count")
        r = time_kept_vs_fresh(device, **shape, counts=(count,) * len(RULES), repeats=repeats, warmup=warmup)
        rows.append({"S": count * len(RULES), "B": shape["batch"], **r})
    return rows


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


def _print_scaling(title: str, key: str, rows: list[dict]) -> None:
    """One row per size, with the local exponent from the row before (log time ratio / log size ratio); the
    S-independent part of a call (similarities to the queue, top-k) flattens the small-S end of the S fit."""
    sizes = [r[key] for r in rows]
    print(f"\n{title}\n")
    print(f"| {key} | kept ms | kept faults/call | local exp. | fresh ms | fresh faults/call | local exp. | "
          "fresh / kept |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    prev = None
    for r in rows:
        k, f = r["kept"], r["fresh"]
        local = ["", ""]
        if prev is not None:
            local = [f"{loglog_exponent([prev[key], r[key]], [prev[n]['ms'], r[n]['ms']]):.2f}"
                     for n in ("kept", "fresh")]
        print(f"| {r[key]} | {k['ms']:.1f} | {k['faults']:.0f} | {local[0]} | {f['ms']:.1f} | {f['faults']:.0f} | "
              f"{local[1]} | {f['ms'] / k['ms']:.2f}x |")
        prev = r
    print(f"| fitted exponent | {loglog_exponent(sizes, [r['kept']['ms'] for r in rows]):.2f} | | | "
          f"{loglog_exponent(sizes, [r['fresh']['ms'] for r in rows]):.2f} | | | |")


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
    parser.add_argument("--no-scaling", action="store_true", help="skip the S and B sweeps")
    parser.add_argument("--counts", default="32,64,128,256", help="slots per rule in the S sweep")
    parser.add_argument("--batches", default="32,64,128,256", help="queries in the B sweep")
    args = parser.parse_args(argv)

    shape = dict(batch=args.batch, queue=args.queue, dim=args.dim, n_hard=args.n_hard, count=args.count)
    paper = time_kept_vs_fresh(args.device, args.batch, args.queue, args.dim, args.n_hard,
                               (args.count,) * len(RULES), repeats=args.repeats, warmup=args.warmup)
    rows = [("vectorised, kept buffers (synco.negatives)", paper["kept"]["ms"], paper["kept"]["faults"]),
            ("vectorised, fresh arrays (before)", paper["fresh"]["ms"], paper["fresh"]["faults"])]
    if not args.no_reference:
        ref_ms = time_reference(args.device, **shape, repeats=args.ref_repeats, warmup=1)
        rows.append(("authors'-style loop (autograd per slot)", ref_ms, None))

    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} B={args.batch} "
        f"K={args.queue} C={args.dim} n_hard={args.n_hard} slots={len(RULES) * args.count} "
        f"repeats={args.repeats} (medians; kept and fresh alternate in one run, outputs bit-identical)\n"
    )
    print("| implementation | median ms per call | page faults per call | vs kept buffers |")
    print("|---|---:|---:|---:|")
    base = rows[0][1]
    for name, ms, faults in rows:
        print(f"| {name} | {ms:.1f} | {'' if faults is None else f'{faults:.0f}'} | {ms / base:.2f}x |")

    if not args.no_scaling:
        ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
        sweep = dict(shape)
        _print_scaling(f"Against S (B={args.batch})", "S",
                       scaling(args.device, "count", ints(args.counts), sweep, args.repeats, args.warmup))
        _print_scaling(f"Against B (S={len(RULES) * args.count})", "B",
                       scaling(args.device, "batch", ints(args.batches), sweep, args.repeats, args.warmup))


if __name__ == "__main__":
    main()
