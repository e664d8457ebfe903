"""What glibc's default handling of freed memory costs a CPU training step (synco.device.keep_freed_memory).

    python benchmarks/bench_allocator.py                    # cpu-demo step, 2 threads, 5 rounds
    python benchmarks/bench_allocator.py --threads 1 --rounds 3

Each round starts two fresh processes, one with the allocator as glibc leaves it and one with freed memory kept
(what `synco pretrain` and `synco eval efficiency` set), alternating; each runs --steps timed cpu-demo optimizer
steps (synthetic negatives on) after a warm-up, on views made as training makes them. Prints the medians of ms
per step and of minor page faults per step, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(mode: str, threads: int, steps: int, warmup: int) -> dict:
    import torch

    from synco.config import load_config
    from synco.engine.train import Trainer

    overrides = [f"threads={threads}", "knn_every=0", "knn_at_end=false", "negatives.warmup_epochs=0",
                 "negatives.cooldown_epochs=0"]
    cfg = load_config("cpu-demo", overrides)
    if mode == "default":  # the Trainer without keep_freed_memory(): glibc's own (dynamic) thresholds
        import synco.engine.train as train_module

        train_module.configure_cpu = lambda threads: threads > 0 and torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, Path(out), progress=False)
        trainer.model.train()
        stream = trainer.data.view_stream(0, 0, cfg.epochs, trainer.batches_per_epoch, trainer.device)
        views = [next(stream) for _ in range(warmup + steps)]
        stream.close()
        for v in views[:warmup]:
            trainer.step([v], True)
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for v in views[warmup:]:
            trainer.step([v], True)
        seconds = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"ms_per_step": seconds / steps * 1e3, "faults_per_step": faults / steps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", choices=("default", "kept"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.steps, args.warmup)))
        return
    if args.rounds < 1 or args.steps < 1:
        sys.exit("--rounds and --steps must be >= 1")
    runs: dict[str, list[dict]] = {"default": [], "kept": []}
    for r in range(args.rounds):
        for mode in runs:
            cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--steps",
                   str(args.steps), "--warmup", str(args.warmup)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            runs[mode].append(res)
            print(f"round {r + 1} {mode:7s} {res['ms_per_step']:7.1f} ms/step {res['faults_per_step']:9.0f} faults/step",
                  flush=True)
    med = {m: {k: statistics.median(x[k] for x in rs) for k in ("ms_per_step", "faults_per_step")}
           for m, rs in runs.items()}
    ratios = [k["ms_per_step"] / d["ms_per_step"] for d, k in zip(runs["default"], runs["kept"])]
    print(f"\ncpu-demo step, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps (medians):")
    print("| allocator | ms / step | page faults / step |\n|---|---|---|")
    for m in runs:
        print(f"| {m} | {med[m]['ms_per_step']:.1f} | {med[m]['faults_per_step']:.0f} |")
    print(f"kept / default, paired per round: median {statistics.median(ratios):.3f}x "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
