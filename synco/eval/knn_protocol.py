"""`synco eval knn`: weighted k-NN on frozen features, features cached next to the result."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine import dist as D
from ..io import atomic_save
from ..options import opt
from .common import (  # noqa: F401 (weights_digest is re-exported)
    EvalOptions,
    eval_datasets,
    eval_image_size,
    load_eval_backbone,
    resolve_device,
    weights_digest,
)
from .knn import check_knn_inputs, extract_features, feature_loader, knn_classify, knn_table
from .results import save_result

logger = logging.getLogger("synco.eval")


@dataclass
class KnnOptions(EvalOptions):
    k: list[int] = opt(factory=lambda: [10, 20, 100, 200], nonempty=True, ge=1,
                       why="k=0 neighbours would report chance level")
    temperature: float = opt(0.07, gt=0)
    cache: bool = True


def _file_stamp(path) -> str:
    """A file's size and modification time (ns): an image overwritten under the same name changes them, at
    the cost of one stat per image (hashing the bytes of a whole dataset would cost a full read)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _data_digest(*datasets) -> str:
    """The images each split lists: for folders every path, label, size and modification time (so new contents
    under old names are seen), for built-in sets their size."""
    h = hashlib.blake2b(digest_size=16)
    for ds in datasets:
        samples = getattr(ds, "samples", None)
        h.update(f"{type(ds).__name__}|{len(ds)}|".encode())
        if samples is not None:
            h.update("\n".join(f"{p}\t{t}\t{_file_stamp(p)}" for p, t in samples).encode())
    return h.hexdigest()


def _cache_key(model: torch.nn.Module, opts: KnnOptions, size: int, train=None, test=None) -> str:
    """Keyed by the weights' content and the data, never by the checkpoint's path or time stamp."""
    desc = json.dumps([weights_digest(model), opts.dataset, str(opts.root), opts.class_list, size,
                       _data_digest(train, test) if train is not None else None], default=str)
    return hashlib.sha1(desc.encode()).hexdigest()[:16]


def _read_cache(cache: Path, key: str):
    """The cached features when they match ``key``; None (with a warning) for a stale or unreadable cache."""
    try:
        stored = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign: rebuild it
        logger.warning("ignoring the feature cache %s (%s): it is unreadable and will be rebuilt",
                       cache, e.__class__.__name__)
        return None
    needed = ("key", "train", "train_labels", "test", "test_labels")
    if not isinstance(stored, dict) or any(k not in stored for k in needed) or stored["key"] != key:
        return None
    if len(stored["train"]) != len(stored["train_labels"]) or len(stored["test"]) != len(stored["test_labels"]):
        return None
    return stored


def run_knn(checkpoint: str, out: Path, opts: KnnOptions, progress: bool = True) -> dict:
    check_knn_inputs(list(opts.k), opts.temperature)
    device = resolve_device(opts.device)
    model, meta = load_eval_backbone(checkpoint, opts, device)
    size = eval_image_size(opts, model)
    train, test = eval_datasets(opts, size)
    check_knn_inputs(list(opts.k), opts.temperature, len(train.classes))
    cache = Path(out) / "knn_features.pt"
    key = _cache_key(model, opts, size, train, test)
    feats = None
    if opts.cache and cache.exists():
        feats = _read_cache(cache, key)
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
    result = {"protocol": "knn", "checkpoint": checkpoint, "backbone": meta["backbone"], "backbone_meta": meta,
              "dataset": opts.dataset, "n_train": len(train), "n_test": len(test),
              "results": {str(k): v for k, v in res.items()}, "options": asdict(opts)}
    if D.is_main():
        save_result(out, "knn", result)
        print(knn_table(res))
    return result
