"""The supervised ceiling of a pretraining preset's backbone: the same timm ViT, trained from scratch *with*
labels for the same number of epochs on the same training images and crops, then scored like the
self-supervised run (k-NN top-1, k=20, on the fixed held-out split) and by its own classifier.

    python benchmarks/supervised_ceiling.py [--config cpu-demo] [--seeds 0 1 2] [key=value ...]

Prints a Markdown table and writes supervised_ceiling.json next to --out (default runs/supervised-ceiling).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from synco.config import load_config
from synco.data.digits import DigitsDataset
from synco.data.transforms import AugmentationParams, TwoViews, byol_view
from synco.engine.optim import create_optimizer, create_scheduler
from synco.eval.knn import top1_at
from synco.eval.knn_protocol import knn_datasets, knn_of
from synco.io import atomic_write_text
from synco.models.backbone import backbone_from_config
from synco.schedules import scaled_lr


def train_supervised(cfg, seed: int) -> dict:
    torch.manual_seed(seed)
    backbone = backbone_from_config(cfg.model, drop_path_rate=cfg.model.drop_path_online)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 10))
    a = cfg.data.augment
    # The crops (scale, ratio) and flips of the SSL views, without colour ops: labels need no invariance to them.
    view = byol_view(cfg.data.image_size, AugmentationParams(
        flip_p=a.flip_p, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
        crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio)))
    data = DigitsDataset("train", transform=TwoViews(view, view), image_size=cfg.data.image_size)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.data.num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    steps = len(loader) * cfg.epochs
    opt = create_optimizer(model, cfg.optim, scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size), torch.device("cpu"))
    sched = create_scheduler(opt, steps, int(cfg.optim.warmup_epochs * len(loader)), cfg.optim.min_lr)
    step, t0 = 0, time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        for (x, _), y in loader:
            sched.step_update(num_updates=step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    seconds = time.perf_counter() - t0
    model.eval()
    train, test = knn_datasets(cfg)
    knn = top1_at(knn_of(backbone, train, test, cfg, torch.device("cpu"), progress=False)[0], 20)
    xs, ys = zip(*(test[i] for i in range(len(test))))
    with torch.no_grad():
        acc = (model(torch.stack(xs)).argmax(1) == torch.tensor(ys)).float().mean().item() * 100
    return {"seed": seed, "knn_top1": knn, "classifier_top1": acc, "train_seconds": seconds, "steps": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cpu-demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/supervised-ceiling")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.data.dataset != "digits":
        raise SystemExit("the supervised ceiling script runs on the built-in digits only")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runs = [train_supervised(cfg, s) for s in args.seeds]
    lines = ["| seed | k-NN top-1 (k=20) | classifier top-1 | train s |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['knn_top1']:.1f} | {r['classifier_top1']:.1f} | {r['train_seconds']:.0f} |"
              for r in runs]
    for key in ("knn_top1", "classifier_top1"):
        v = [r[key] for r in runs]
        sd = statistics.stdev(v) if len(v) > 1 else float("nan")
        lines.append(f"\n{key}: mean {statistics.mean(v):.1f} ± {sd:.1f} over {len(v)} seeds")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"config": args.config, "overrides": args.overrides, "runs": runs}, indent=2) + "\n",
                      out / "supervised_ceiling.json")


if __name__ == "__main__":
    main()
