"""`synco eval knn`: weighted k-NN on frozen features, features cached next to the result."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..engine import dist as D
from ..engine.checkpoint import atomic_save
from .common import EvalOptions, eval_datasets, eval_image_size, load_eval_backbone, resolve_device
from .knn import extract_features, feature_loader, knn_classify, knn_table
from .results import save_result


@dataclass
class KnnOptions(EvalOptions):
    k: list = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    cache: bool = True


def _cache_key(checkpoint: str, opts: KnnOptions, size: int) -> str:
    p = Path(checkpoint)
    stamp = p.stat().st_mtime_ns if p.exists() and p.is_file() else str(p)
    desc = json.dumps([str(p.resolve()) if p.exists() else checkpoint, stamp, opts.dataset, opts.root,
                       opts.class_list, size, opts.seed, opts.backbone], default=str)
    return hashlib.sha1(desc.encode()).hexdigest()[:16]


def run_knn(checkpoint: str, out: Path, opts: KnnOptions, progress: bool = True) -> dict:
    device = resolve_device(opts.device)
    model, meta = load_eval_backbone(checkpoint, opts, device)
    size = eval_image_size(opts, model)
    train, test = eval_datasets(opts, size)
    cache = Path(out) / "knn_features.pt"
    key = _cache_key(checkpoint, opts, size)
    feats = None
    if opts.cache and cache.exists():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            feats = stored
    if feats is None:
        ftr, ytr = extract_features(model, feature_loader(train, opts.batch_size, opts.num_workers), device,
                                    desc="train features", progress=progress)
        fte, yte = extract_features(model, feature_loader(test, opts.batch_size, opts.num_workers), device,
                                    desc="test features", progress=progress)
        feats = {"key": key, "train": ftr.cpu(), "train_labels": ytr.cpu(), "test": fte.cpu(),
                 "test_labels": yte.cpu()}
        if opts.cache and D.is_main():
            Path(out).mkdir(parents=True, exist_ok=True)
            atomic_save(feats, cache)
    res = knn_classify(feats["train"].to(device), feats["train_labels"].to(device), feats["test"].to(device),
                       feats["test_labels"].to(device), ks=opts.k, temperature=opts.temperature,
                       num_classes=len(train.classes))
    result = {"protocol": "knn", "checkpoint": checkpoint, "backbone": meta["backbone"],
              "dataset": opts.dataset, "n_train": len(train), "n_test": len(test),
              "results": {str(k): v for k, v in res.items()}, "options": asdict(opts)}
    if D.is_main():
        save_result(out, "knn", result)
        print(knn_table(res))
    return result
