"""Transfer datasets (tiny fake on-disk layouts), VOC mAP, missing-dataset messages, and `synco report`."""

from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import synco.eval.transfer as T
from synco.cli.main import main
from synco.errors import SyncoError
from synco.eval.probe import multilabel_map
from synco.eval.report import create_report, write_report
from synco.eval.transfer import TransferOptions, create_transfer_split, run_transfer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Fake datasets in torchvision's on-disk formats


def fake_cifar10(root, per_class_train=3, per_class_test=1):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(per_class, offset):
        labels = [c for c in range(10) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        data[:, :1024] = np.asarray(labels, dtype=np.uint8)[:, None] * 20 + offset  # red plane encodes the class
        return {"data": data, "labels": labels}

    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_class_train if i == 1 else 0, 0), f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch(per_class_test, 5), f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # Fabricated files cannot match torchvision's MD5 checksums: accept any existing file.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    return fake_cifar10(tmp_path / "data")


def fake_voc2007(root):
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    objects = {"trainval": [["dog"], ["cat", "person"], ["dog", "person"], ["car"], ["cat"], ["person"]],
               "test": [["dog"], ["cat"], ["person", "car"], ["dog", "cat"]]}
    rng = np.random.default_rng(0)
    for split, per_image in objects.items():
        ids = []
        for i, names in enumerate(per_image):
            ident = f"{split[:2]}{i:04d}"
            ids.append(ident)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{ident}.jpg")
            objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
            (voc / "Annotations" / f"{ident}.xml").write_text(
                f"<annotation><filename>{ident}.jpg</filename>{objs}</annotation>")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root, objects


def transfer_opts(root, **kw) -> TransferOptions:
    from synco.config import apply_overrides

    o = apply_overrides(TransferOptions(), [f"root={root}", "backbone=cpu-demo", "num_workers=0", "device=cpu",
                                            "batch_size=10", "linear.epochs=1", "linear.warmup_epochs=0",
                                            "finetune.epochs=1", "finetune.warmup_epochs=0"])
    for k, v in kw.items():
        setattr(o, k, v)
    return o


# ---------------------------------------------------------------------------------------------
# Transfer


def test_cifar10_split_read_through_torchvision(cifar_root):
    train, test = create_transfer_split("cifar10", cifar_root)
    assert len(train) == 30 and len(test) == 10 and train.classes == [f"c{i}" for i in range(10)]
    img, label = train[4]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 1
    assert np.asarray(img)[0, 0, 0] == 20  # the pixels of sample 4 (class 1) come back in HWC order
    assert train.targets == [c for c in range(10) for _ in range(3)]


def test_transfer_linear_and_finetune_on_fake_cifar10(cifar_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    res = run_transfer("random", out, transfer_opts(cifar_root, datasets=["cifar10"], modes=["linear", "finetune"]),
                       progress=False)
    r = res["results"]["cifar10"]
    assert r["linear"]["metric"] == "top1" and r["linear"]["n_train"] == 30 and r["linear"]["n_test"] == 10
    assert set(res["report"]) == {"CIFAR-10 (lin)", "CIFAR-10 (ft)"}
    saved = json.loads((out / "transfer.json").read_text())
    assert saved["report"] == res["report"]
    sub = json.loads((out / "transfer" / "cifar10" / "linear.json").read_text())
    assert sub["part_of"] == "transfer" and [g["base_lr"] for g in sub["grid"]] == [1.0]  # lr fixed at 1.0
    assert sub["selected_on"] == "test" and sub["n_heldout"] == 0
    assert res["report"]["CIFAR-10 (lin)"] == sub["last"]["top1"]
    assert (out / "transfer" / "cifar10" / "linear_head.pt").exists()
    assert "CIFAR-10" in capsys.readouterr().out

    # a finished dataset is not trained again
    def boom(*a, **k):
        raise AssertionError("re-ran a finished transfer")

    monkeypatch.setattr(T, "linear_probe", boom)
    monkeypatch.setattr(T, "finetune", boom)
    again = run_transfer("random", out, transfer_opts(cifar_root, datasets=["cifar10"], modes=["linear", "finetune"]),
                         progress=False)
    assert again["report"] == res["report"]


def test_voc2007_multilabel_map(tmp_path):
    root, objects = fake_voc2007(tmp_path / "data")
    train, test = create_transfer_split("voc2007", root)
    assert len(train) == 6 and len(test) == 4 and len(train.classes) == 20
    img, target = test[2]
    assert img.mode == "RGB" and target.dtype == torch.float32
    assert {train.classes[i] for i in target.nonzero().flatten().tolist()} == {"person", "car"}
    res = run_transfer("random", tmp_path / "out", transfer_opts(root, datasets=["voc2007"]), progress=False)
    r = res["results"]["voc2007"]["linear"]
    assert r["metric"] == "map" and 0.0 <= r["value"] <= 100.0 and "VOC2007 (lin)" in res["report"]


def test_map_matches_sklearn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 5, generator=g)
    targets = (torch.rand(30, 5, generator=g) > 0.6).float()
    targets[0] = 1  # every label has a positive
    expected = 100 * average_precision_score(targets.numpy(), logits.numpy(), average="macro")
    assert multilabel_map(logits, targets) == pytest.approx(expected, abs=1e-4)
    targets[:, 2] = 0  # a label without positives has no AP: it is left out of the mean
    keep = [0, 1, 3, 4]
    expected = 100 * average_precision_score(targets[:, keep].numpy(), logits[:, keep].numpy(), average="macro")
    assert multilabel_map(logits, targets) == pytest.approx(expected, abs=1e-4)


def test_missing_and_unknown_datasets(tmp_path, cifar_root, capsys):
    with pytest.raises(SyncoError) as e:
        run_transfer("random", tmp_path / "o", transfer_opts(tmp_path / "empty", datasets=["dtd", "sun397"]))
    msg = str(e.value)
    assert str(tmp_path / "empty" / "dtd" / "dtd") in msg and "torchvision.datasets.DTD" in msg
    assert str(tmp_path / "empty" / "SUN397") in msg and "torchvision.datasets.SUN397" in msg
    assert not (tmp_path / "empty").exists()  # nothing created while checking
    # via the CLI: --datasets picks the subset, the message is one paragraph, exit code 2
    rc = main(["eval", "transfer", "device=cpu", "--checkpoint", "random", "backbone=cpu-demo", f"root={cifar_root}",
               "--datasets", "cifar10,caltech101", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Caltech-101" in err and "torchvision.datasets.Caltech101" in err and "CIFAR-10 " not in err
    rc = main(["eval", "transfer", "device=cpu", "--checkpoint", "random", "backbone=cpu-demo", f"root={cifar_root}",
               "--datasets", "cifar11", "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown transfer dataset(s) cifar11" in capsys.readouterr().err


def test_corrupt_dataset_names_the_class(tmp_path):
    fake_cifar10(tmp_path)  # real torchvision checks: the MD5s do not match
    with pytest.raises(SyncoError, match="torchvision.datasets.CIFAR10 cannot read"):
        create_transfer_split("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------------
# Report


def _write(path, data, mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def _knn(ck, top1s, dataset="digits"):
    return {"protocol": "knn", "checkpoint": ck, "backbone": "vit_tiny", "dataset": dataset,
            "results": {str(k): {"top1": v, "top5": 99.0} for k, v in zip((10, 20, 100, 200), top1s)}}


def _res(protocol, ck, report, dataset="digits", method=None, **extra):
    meta = {"backbone": "vit_tiny", "method": method} if method else {"backbone": "vit_tiny"}
    return {"protocol": protocol, "checkpoint": ck, "backbone": "vit_tiny", "backbone_meta": meta,
            "dataset": dataset, "report": report, **extra}


@pytest.fixture
def results_tree(tmp_path):
    run_a, run_b = tmp_path / "runs" / "synco-a", tmp_path / "runs" / "moby-b"
    for run, method in ((run_a, "synco"), (run_b, "moby")):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"method: {method}\nepochs: 6\n")
    ev = tmp_path / "runs"
    _write(run_a / "eval" / "knn.json", _knn(str(run_a / "checkpoint.pt"), [70.0, 70.5, 67.5, 65.25]))
    _write(run_a / "eval" / "linear.json", _res("linear", str(run_a), {"Linear top-1": 73.1, "Linear top-5": 91.0},
                                                method="synco"))
    _write(run_a / "eval" / "finetune.json", _res("finetune", str(run_a), {"Fine-tune top-1": 80.0}))
    _write(run_a / "eval" / "transfer.json",
           _res("transfer", str(run_a), {"CIFAR-10 (lin)": 95.5, "VOC2007 (lin)": 80.25}, dataset="transfer"))
    _write(run_a / "eval" / "transfer" / "cifar10" / "linear.json",
           _res("linear", str(run_a), {"Linear top-1": 1.0}, dataset="cifar10", part_of="transfer"))
    _write(run_b / "eval" / "knn.json", _knn(str(run_b), [64.0, 64.25, 61.0, 59.75]), mtime=1_000)
    _write(run_b / "eval" / "old" / "knn.json", _knn(str(run_b), [1.0, 1.0, 1.0, 1.0]), mtime=10)  # older: loses
    _write(ev / "eval-random" / "knn.json", {**_knn("random", [40.0, 42.5, 30.0, 29.0]), "backbone": "vit_tiny"})
    _write(ev / "eval-random" / "linear.json", _res("linear", "random", {"Linear top-1": 20.0, "Linear top-5": 60.0}))
    (ev / "eval-random" / "notes.json").write_text("[1, 2]")  # not a result: ignored
    return tmp_path, run_a, run_b


def test_report_table(results_tree):
    root, run_a, run_b = results_tree
    rows, cols = create_report([root / "runs"])
    assert cols == ["Method", "Backbone", "Run", "k-NN k=10", "k-NN k=20", "k-NN k=100", "k-NN k=200",
                    "Linear top-1", "Linear top-5", "Fine-tune top-1", "CIFAR-10 (lin)", "VOC2007 (lin)"]
    by_run = {r["Run"]: r for r in rows}
    assert set(by_run) == {"synco-a", "moby-b", "random"}
    a = by_run["synco-a"]
    assert (a["Method"], a["k-NN k=20"], a["Linear top-1"], a["Fine-tune top-1"], a["CIFAR-10 (lin)"]) == \
        ("synco", 70.5, 73.1, 80.0, 95.5)
    assert by_run["moby-b"]["Method"] == "moby" and by_run["moby-b"]["k-NN k=10"] == 64.0  # newest file wins
    assert "Linear top-1" not in by_run["moby-b"]
    assert by_run["random"]["Method"] == "random init" and by_run["random"]["Linear top-5"] == 60.0


def test_report_marks_datasets_when_a_metric_has_several(tmp_path):
    _write(tmp_path / "a" / "knn.json", _knn("random", [1.0, 2.0, 3.0, 4.0], dataset="digits"))
    _write(tmp_path / "b" / "knn.json", _knn("random", [5.0, 6.0, 7.0, 8.0], dataset="folder"))
    rows, cols = create_report([tmp_path / "a", tmp_path / "b"])
    assert "k-NN k=20 [digits]" in cols and "k-NN k=20 [folder]" in cols and len(rows) == 1
    assert rows[0]["k-NN k=20 [folder]"] == 6.0


def test_report_cli_writes_markdown_and_csv(results_tree, tmp_path, capsys):
    root, _, _ = results_tree
    out = tmp_path / "rep"
    assert main(["report", str(root / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert printed.strip() == md.strip()
    lines = md.splitlines()
    assert lines[0].startswith("| Method | Backbone | Run | k-NN k=10 |")
    assert "| synco | vit_tiny | synco-a | 70.00 | 70.50 | 67.50 | 65.25 | 73.10 | 91.00 | 80.00 | 95.50 | 80.25 |" in md
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {r["Run"] for r in table} == {"synco-a", "moby-b", "random"}
    assert next(r for r in table if r["Run"] == "moby-b")["k-NN k=200"] == "59.7500"
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SyncoError, match="no result JSON"):
        write_report([root / "runs" / "synco-a" / "eval" / "transfer" / "cifar10"], out)
