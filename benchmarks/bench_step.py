"""Cost of synthetic negatives relative to a whole training step, in one run.

    python benchmarks/bench_step.py --device cpu            # this laptop/CI box
    python benchmarks/bench_step.py --device cuda           # a GPU: bf16 autocast, batch 128 for DeiT-S

Times (median of --repeats after warm-up): (a) generating the papers' synthetic negatives for both views
(B=128 queries per device, K=4096, C=256, n_hard=256, 6 x 128 slots), (b) one full SynCo optimizer step of
the cpu-demo model at its batch (128), (c) one full SynCo step of DeiT-S/16 + 4096-d heads at 224 px.
On CPU a DeiT-S step at batch 128 takes minutes, so (c) runs at --deit-batch (default 8 on CPU) and is
scaled linearly to 128 images; the table says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_negatives import time_negatives  # noqa: E402

from synco.config import load_config  # noqa: E402
from synco.engine.optim import create_optimizer  # noqa: E402
from synco.models.method import create_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(preset: str, overrides: list[str], batch: int, device: torch.device, repeats: int,
              warmup: int = 1) -> float:
    cfg = load_config(preset, overrides + [f"optim.batch_size={batch}"], needs_data=False)
    torch.manual_seed(0)
    model = create_model(cfg).to(device).train()
    opt = create_optimizer(model, cfg.optim, 1e-4, device)
    size = cfg.model.backbone_kwargs.get("img_size", 224)
    x1 = torch.randn(batch, 3, size, size, device=device)
    x2 = torch.randn(batch, 3, size, size, device=device)
    bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, (k1, k2) = model(x1, x2, use_synthetic=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.momentum_update(0.99)
        if model.queue is None or model.queue.size % batch == 0:
            model.enqueue(k1, k2)

    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--deit-batch", type=int, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    deit_batch = args.deit_batch or (128 if device.type == "cuda" else 8)

    neg_ms = 2 * time_negatives(str(device), batch=128, queue=4096, dim=256, n_hard=256, count=128,
                                repeats=max(args.repeats, 5), warmup=1, seed=0)
    demo_ms = time_step("cpu-demo", ["contrast.queue_size=1024"], 128, device, args.repeats)
    deit_ms = time_step("synco-imagenet-deit-s", ["device=cpu"], deit_batch, device, args.repeats)
    deit_128 = deit_ms * 128 / deit_batch
    note = "" if deit_batch == 128 else f" (measured at batch {deit_batch}, scaled x{128 / deit_batch:g})"
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}\n")
    print("| what | median ms | synthetic negatives / step |")
    print("|---|---:|---:|")
    print(f"| synthetic negatives, both views (B=128, K=4096, C=256, N=256, 6x128) | {neg_ms:.1f} | |")
    print(f"| cpu-demo SynCo step, batch 128 | {demo_ms:.1f} | {neg_ms / demo_ms:.1%} |")
    print(f"| DeiT-S/16 SynCo step, batch 128{note} | {deit_128:.1f} | {neg_ms / deit_128:.1%} |")


if __name__ == "__main__":
    main()
