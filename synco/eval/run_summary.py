"""End-of-run k-NN: the trained backbone vs the same backbone untrained vs raw pixels (built-in data)."""

from __future__ import annotations

import torch
from torch.utils.data import Subset

from ..engine import dist as D
from ..errors import SyncoError
from ..models.backbone import backbone_from_config
from .common import EvalOptions, eval_datasets
from .knn import extract_features, feature_loader, knn_classify, nearest_k, top1_at


def knn_datasets(cfg):
    """(train, test) labelled datasets with the evaluation transform, or None when k-NN cannot be measured:
    no val split next to the training data, or a single class (100 % by construction)."""
    return _knn_sets(cfg)[0]


def _knn_sets(cfg):
    """((train, test) or None, why not)."""
    d = cfg.data
    opts = EvalOptions(dataset=d.dataset, root=d.root, class_list=d.class_list, image_size=d.image_size)
    try:
        train, test = eval_datasets(opts, d.image_size)
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
    ftr, ytr = extract_features(model, feature_loader(train, num_workers=cfg.data.num_workers), device,
                                desc=f"k-NN train {tag}", progress=progress)
    fte, yte = extract_features(model, feature_loader(test, num_workers=cfg.data.num_workers), device,
                                desc=f"k-NN test {tag}", progress=progress)
    return knn_classify(ftr, ytr, fte, yte, ks=cfg.knn.k, temperature=cfg.knn.temperature,
                        num_classes=len(train.classes))


class _Pixels(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


@torch.no_grad()
def evaluate_run(cfg, backbone: torch.nn.Module, device, progress: bool = True) -> dict:
    sets, why_not = _knn_sets(cfg)
    if sets is None:
        return {"knn_note": why_not}
    train, test = sets
    was_training = backbone.training
    trained = knn_of(backbone, train, test, cfg, device, progress, "trained")
    torch.manual_seed(cfg.seed)  # the same initial weights the run started from
    random_init = backbone_from_config(cfg.model).to(device)
    untrained = knn_of(random_init, train, test, cfg, device, progress, "random init")
    k20 = nearest_k(trained, 20)  # the papers' k=20, or the evaluated k closest to it
    out = {"knn_k": list(cfg.knn.k), "knn": {str(k): v for k, v in trained.items()},
           "knn_top1": top1_at(trained, k20), "knn_top5": trained[k20]["top5"], "knn_top1_k": int(k20),
           "knn_random_init": {str(k): v for k, v in untrained.items()},
           "knn_top1_random_init": top1_at(untrained, k20)}
    if cfg.data.dataset == "digits":
        pixels = knn_of(_Pixels(), train, test, cfg, device, progress, "pixels")
        out["knn_pixels"] = {str(k): v for k, v in pixels.items()}
        out["knn_top1_pixels"] = top1_at(pixels, k20)
    backbone.train(was_training)
    D.barrier()
    return out
