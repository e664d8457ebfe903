"""Weighted k-NN: against a brute-force reference, chunking, and `synco eval knn` on random vs a run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from synco.cli.main import main
from synco.eval.knn import extract_features, feature_loader, knn_classify
from synco.models.backbone import create_backbone, export_safetensors, load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_knn(train, train_y, test, test_y, k, T, num_classes):
    """One test sample at a time, straight from the definition (Wu et al. 2018). Top-5 is None when some
    sample's 5th and 6th classes tie (e.g. both without votes): then it depends on tie-breaking."""
    top1 = top5 = 0
    ambiguous = False
    for q, y in zip(test, test_y):
        sims = [float(q @ t) for t in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += float(torch.tensor(sims[i] / T).exp())
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:5]
        ambiguous |= num_classes > 5 and votes[ranked[4]] == votes[ranked[5]]
    return 100.0 * top1 / len(test), None if ambiguous else 100.0 * top5 / len(test)


def _features(n, dim=12, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = F.normalize(centers[y] + 0.3 * torch.randn(n, dim, generator=g), dim=1)
    return x, y


def test_knn_matches_brute_force():
    train, train_y = _features(60)
    test, test_y = _features(25, seed=1)
    res = knn_classify(train, train_y, test, test_y, ks=(1, 5, 20, 200), temperature=0.07, num_classes=7)
    assert sorted(res) == [1, 5, 20, 60]  # k larger than the bank is clipped to the bank
    checked_top5 = []
    for k in (1, 5, 20, 60):
        top1, top5 = brute_force_knn(train, train_y, test, test_y, k, 0.07, 7)
        assert res[k]["top1"] == pytest.approx(top1)
        if top5 is not None:
            assert res[k]["top5"] == pytest.approx(top5)
            checked_top5.append(k)
    assert 60 in checked_top5  # with the whole bank as neighbours every class has a vote
    assert res[5]["top1"] > 100 / 7 * 2  # clustered features: far above chance


def test_chunked_similarity_gives_the_same_answer():
    train, train_y = _features(200, seed=2)
    test, test_y = _features(50, seed=3)
    whole = knn_classify(train, train_y, test, test_y, ks=(10, 20, 100), num_classes=7)
    chunked = knn_classify(train, train_y, test, test_y, ks=(10, 20, 100), num_classes=7, test_chunk=7,
                           train_chunk=13)
    assert chunked == whole


def _fake_run(run_dir):
    """A pretraining run directory as `synco pretrain` leaves it: checkpoint.pt (+ an exported backbone)."""
    from synco.config import load_config

    cfg = load_config("cpu-demo")
    torch.manual_seed(123)
    bb = create_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs)
    run_dir.mkdir(parents=True)
    torch.save({"config": cfg.to_dict(), "model": {f"online.backbone.{k}": v for k, v in bb.state_dict().items()},
                "epoch": 6}, run_dir / "checkpoint.pt")
    export_safetensors(bb, {"backbone": cfg.model.backbone, "backbone_kwargs": cfg.model.backbone_kwargs,
                            "bn_before_mlp": False}, run_dir / "backbone.safetensors")
    return bb


def test_cli_knn_on_random_and_on_a_run(tmp_path, digits_folder):
    run = tmp_path / "run"
    bb = _fake_run(run)
    common = ["dataset=folder", f"root={digits_folder}", "num_workers=0", "device=cpu", "k=[5, 20]", "batch_size=128"]
    assert main(["eval", "knn", "--checkpoint", str(run), "--no-progress", *common]) == 0
    assert main(["eval", "knn", "--checkpoint", str(run / "backbone.safetensors"), "--out", str(tmp_path / "st"),
                 "--no-progress", *common]) == 0
    assert main(["eval", "knn", "--checkpoint", "random", "backbone=cpu-demo", "--out", str(tmp_path / "rnd"),
                 "--no-progress", *common]) == 0
    from_run = json.loads((run / "eval" / "knn.json").read_text())  # default --out: <run>/eval
    from_st = json.loads((tmp_path / "st" / "knn.json").read_text())
    rnd = json.loads((tmp_path / "rnd" / "knn.json").read_text())
    assert from_run["results"] == from_st["results"]  # checkpoint.pt and the exported file are the same backbone
    assert from_run["n_train"] == 200 and from_run["n_test"] == 100 and sorted(from_run["results"]) == ["20", "5"]
    assert rnd["results"] != from_run["results"]  # another backbone, other numbers

    # the numbers are the k-NN of that backbone's features
    from synco.eval.common import EvalOptions, eval_datasets

    model, _ = load_backbone(str(run), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), bb.state_dict().values()))
    opts = EvalOptions(dataset="folder", root=str(digits_folder), num_workers=0, device="cpu")
    train, test = eval_datasets(opts, 16)
    ftr, ytr = extract_features(model, feature_loader(train, 64), "cpu", progress=False)
    fte, yte = extract_features(model, feature_loader(test, 64), "cpu", progress=False)
    ref = knn_classify(ftr, ytr, fte, yte, ks=(5, 20), num_classes=10)
    for k in (5, 20):
        assert from_run["results"][str(k)]["top1"] == pytest.approx(ref[k]["top1"])
        assert from_run["results"][str(k)]["top5"] == pytest.approx(ref[k]["top5"])
