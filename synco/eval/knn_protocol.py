"""The k-NN protocol (the maths is in knn.py): `synco eval knn`, with its features cached next to the result, and
the k-NN of a pretraining run: the monitor that gives it a learning curve, and the end-of-run evaluation."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Subset

from ..data.folder import UNREADABLE
from ..engine import dist
from ..errors import SyncoError
from ..io import atomic_save
from ..models.backbone import backbone_from_config
from ..options import opt
from .common import (  # noqa: F401 (weights_digest is re-exported)
    EvalOptions,
    eval_datasets,
    eval_image_size,
    load_eval_backbone,
    resolve_device,
    weights_digest,
)
from .knn import check_knn_inputs, extract_features, feature_loader, knn_classify, knn_table, nearest_k, top1_at
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
    if not all(isinstance(stored[k], torch.Tensor) for k in needed[1:]):
        return None
    if len(stored["train"]) != len(stored["train_labels"]) or len(stored["test"]) != len(stored["test_labels"]):
        return None
    # The key proves which weights and images the features came from, not that the file was not damaged (or
    # edited) since: NaN or inf features would give 0.00 without a word, so they are extracted again.
    if not all(bool(torch.isfinite(stored[k].float()).all()) for k in ("train", "test")):
        logger.warning("ignoring the feature cache %s: it holds features that are not finite (NaN or inf), so it "
                       "is damaged and will be rebuilt", cache)
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
        if opts.cache and dist.is_main():
            Path(out).mkdir(parents=True, exist_ok=True)
            atomic_save(feats, cache)
    res = knn_classify(feats["train"].to(device), feats["train_labels"].to(device), feats["test"].to(device),
                       feats["test_labels"].to(device), ks=opts.k, temperature=opts.temperature,
                       num_classes=len(train.classes))
    result = {"protocol": "knn", "checkpoint": checkpoint, "backbone": meta["backbone"], "backbone_meta": meta,
              "dataset": opts.dataset, "n_train": len(train), "n_test": len(test),
              "results": {str(k): v for k, v in res.items()}, "options": asdict(opts)}
    if dist.is_main():
        save_result(out, "knn", result)
        print(knn_table(res))
    return result


# ---------------------------------------------------------------------------------------------
# The k-NN of a pretraining run: its data, the monitor (every ``knn_every`` epochs, k-NN top-1 of the online
# backbone on the held-out split, so a run has a learning curve, as solo-learn's online k-NN callback gives, not
# just an end point), and the end-of-run evaluation (the trained backbone vs the same backbone untrained vs raw
# pixels on built-in data).


def knn_datasets(cfg):
    """(train, test) labelled datasets with the evaluation transform, or None when k-NN cannot be measured:
    no val split next to the training data, or a single class (100 % by construction)."""
    return _knn_sets(cfg)[0]


def _knn_sets(cfg):
    """((train, test) or None, why not)."""
    d = cfg.data
    opts = EvalOptions(dataset=d.dataset, root=d.root, class_list=d.class_list, image_size=d.image_size)
    try:
        # the k-NN of a pretraining run (hours in, every process in step) leaves an unreadable image out, and says so
        train, test = eval_datasets(opts, d.image_size, unreadable="exclude")
    except SyncoError as e:  # no val split, or one whose class folders differ from train's: say which
        return None, f"k-NN skipped: {e}"
    if len(train.classes) < 2:
        return None, (f"the data has {len(train.classes)} class: k-NN accuracy would be 100 % by construction, "
                      "so it was skipped")
    return (_cap(train, cfg.knn.max_train, cfg.seed), _cap(test, cfg.knn.max_test, cfg.seed)), None


def _cap(ds, n, seed):
    if not n or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    sub = Subset(ds, idx.tolist())
    sub.classes = ds.classes
    return sub


def knn_of(model, train, test, cfg, device, progress=True, tag=""):
    """k-NN results of ``model`` on the run's sets; images that could not be read (label UNREADABLE) are left out
    of the bank and of the scored queries, and counted in ``left_out`` (never replaced by a neighbour)."""
    ftr, ytr = extract_features(model, feature_loader(train, num_workers=cfg.data.num_workers), device,
                                desc=f"k-NN train {tag}", progress=progress)
    fte, yte = extract_features(model, feature_loader(test, num_workers=cfg.data.num_workers), device,
                                desc=f"k-NN test {tag}", progress=progress)
    keep_tr, keep_te = ytr != UNREADABLE, yte != UNREADABLE
    left_out = int((~keep_tr).sum()) + int((~keep_te).sum())
    if left_out:
        logger.warning("k-NN %s: %d unreadable image(s) left out (see the 'synco.data' warnings)", tag, left_out)
    results = knn_classify(ftr[keep_tr], ytr[keep_tr], fte[keep_te], yte[keep_te], ks=cfg.knn.k,
                           temperature=cfg.knn.temperature, num_classes=len(train.classes))
    return results, left_out


def knn_monitor(cfg) -> Optional[callable]:
    """An epoch hook for :class:`synco.engine.train.Trainer`, or None when off or the data has no val split."""
    if cfg.knn_every <= 0:
        return None
    sets = knn_datasets(cfg)  # built once: only the features change between calls
    if sets is None:
        return None
    train, test = sets

    def hook(trainer, epoch: int) -> Optional[dict]:
        if (epoch + 1) % cfg.knn_every and epoch + 1 != cfg.epochs:
            return None
        results, _ = knn_of(trainer.model.online.backbone, train, test, cfg, trainer.device, progress=False)
        return {"knn_top1": top1_at(results, 20)}

    return hook


class _Pixels(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


# The numbers evaluate_run puts in summary.json (besides its per-k tables).
KNN_NUMBERS = ("knn_top1", "knn_top5", "knn_top1_k", "knn_top1_random_init", "knn_top1_pixels", "knn_left_out")
KNN_PERCENTS = ("knn_top1", "knn_top5", "knn_top1_random_init", "knn_top1_pixels")  # accuracies, in [0, 100]


@torch.no_grad()
def evaluate_run(cfg, backbone: torch.nn.Module, device, progress: bool = True) -> dict:
    sets, why_not = _knn_sets(cfg)
    if sets is None:
        return {"knn_note": why_not}
    train, test = sets
    was_training = backbone.training
    trained, left_out = knn_of(backbone, train, test, cfg, device, progress, "trained")
    torch.manual_seed(cfg.seed)  # the same initial weights the run started from
    random_init = backbone_from_config(cfg.model).to(device)
    untrained, _ = knn_of(random_init, train, test, cfg, device, progress, "random init")
    k20 = nearest_k(trained, 20)  # the papers' k=20, or the evaluated k closest to it
    out = {"knn_k": list(cfg.knn.k), "knn": {str(k): v for k, v in trained.items()},
           "knn_top1": top1_at(trained, k20), "knn_top5": trained[k20]["top5"], "knn_top1_k": int(k20),
           "knn_random_init": {str(k): v for k, v in untrained.items()},
           "knn_top1_random_init": top1_at(untrained, k20)}
    if left_out:
        out["knn_left_out"] = left_out  # unreadable images, in the bank or among the queries
    if cfg.data.dataset == "digits":
        pixels, _ = knn_of(_Pixels(), train, test, cfg, device, progress, "pixels")
        out["knn_pixels"] = {str(k): v for k, v in pixels.items()}
        out["knn_top1_pixels"] = top1_at(pixels, k20)
    backbone.train(was_training)
    dist.barrier()
    return out
