"""Robustness / OOD evaluation: FPR95, wnid masking, benchmark folders, on-the-fly corruptions, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from synco.errors import SyncoError
from synco.eval.benchmarks import find_v2_variants
from synco.eval.classes import class_index_map, masked_argmax
from synco.eval.corruptions import IMAGENET_C, Corruption, Watermark, summarize_corruptions
from synco.eval.head import Classifier, LinearHead, save_head
from synco.eval.ood import auroc, fpr_at_tpr, max_softmax_probability, ood_metrics
from synco.eval.robustness import RobustnessEvaluator, RobustnessOptions
from synco.eval.robustness_tables import table13_row
from synco.eval.views import BenchmarkView, center_crop_ops

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# FPR95


def test_fpr95_on_a_constructed_score_distribution():
    # 100 in-distribution scores 0.01..1.00: keeping 95% of them means threshold 0.06 (0.06..1.00 kept).
    id_scores = np.arange(1, 101) / 100
    # 20 OOD scores: 12 below 0.06, 8 at or above it -> FPR95 = 8 / 20 = 40%.
    ood = np.array([0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05, 0.055,
                    0.06, 0.2, 0.4, 0.5, 0.7, 0.9, 0.95, 0.99])
    assert fpr_at_tpr(id_scores, ood) == pytest.approx(40.0)
    assert fpr_at_tpr(torch.as_tensor(id_scores), torch.as_tensor(ood)) == pytest.approx(40.0)
    # Brute force: the largest threshold keeping >= 95% of ID, then the OOD fraction at or above it.
    t = max(s for s in id_scores if (id_scores >= s).mean() >= 0.95)
    assert fpr_at_tpr(id_scores, ood) == pytest.approx(100 * (ood >= t).mean())
    # AUROC: fraction of (ID, OOD) pairs ordered correctly (ties count half).
    pairs = (id_scores[:, None] > ood[None]).mean() + 0.5 * (id_scores[:, None] == ood[None]).mean()
    assert auroc(id_scores, ood) == pytest.approx(100 * pairs)


def test_fpr95_extremes_and_errors():
    ind, ood = np.linspace(0.6, 1.0, 50), np.linspace(0.0, 0.5, 30)
    assert fpr_at_tpr(ind, ood) == 0.0
    assert fpr_at_tpr(ood, ind) == 100.0  # OOD scores all higher: every OOD sample passes
    assert fpr_at_tpr(np.full(10, 0.5), np.full(10, 0.5)) == 100.0
    m = ood_metrics(ind, ood)
    assert m["auroc"] == 100.0 and m["n_id"] == 50 and m["n_ood"] == 30
    with pytest.raises(SyncoError):
        fpr_at_tpr([], [0.1])
    with pytest.raises(SyncoError):
        fpr_at_tpr([0.1, float("nan")], [0.1])
    msp = max_softmax_probability(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
    assert msp[0] == pytest.approx(0.5) and msp[1] > 0.99


# ---------------------------------------------------------------------------------------------
# Class matching and masking


def test_class_index_map_by_name_and_integer_folders():
    head = ["n001", "n002", "n003", "n004"]
    assert class_index_map(["n004", "n002"], head) == {"n004": 3, "n002": 1}
    assert class_index_map(["n004", "nXXX"], head) == {"n004": 3}
    assert class_index_map(["3", "1"], ["0", "1", "2", "3"]) == {"3": 3, "1": 1}  # names win over indices
    # ImageNet-v2: integer folders index the 1000 sorted ImageNet classes, never a smaller head's.
    assert class_index_map(["0", "3", "999", "1000"], HEAD_CLASSES) == {"0": 0, "3": 3, "999": 999}
    assert class_index_map(["0", "3"], head) == {}


def test_masked_argmax_picks_among_allowed_classes():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 9.0, 1.0]])
    allowed = torch.tensor([0, 3])
    assert masked_argmax(logits, allowed).tolist() == [3, 0]
    assert masked_argmax(logits, torch.arange(4)).tolist() == [1, 2]


HEAD_CLASSES = [f"n{i:08d}" for i in range(1000)]
SUBSET = [HEAD_CLASSES[5 * k + 2] for k in range(200)]  # 200 classes, far from their folder position


class CodeModel(nn.Module):
    """Reads the class code k from the red channel of a solid image (normalised input) and scores head
    class 5k+2 with 1; with ``distract`` it scores 5k+3 (never among the 200 folders) with 2. Green = 255
    marks an OOD image: flat logits."""

    def __init__(self, distract: bool, index_of_code=lambda k: 5 * k + 2):
        super().__init__()
        self.distract, self.index_of_code = distract, index_of_code
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        px = (x[:, :, 0, 0] * torch.tensor(IMAGENET_DEFAULT_STD) + torch.tensor(IMAGENET_DEFAULT_MEAN)) * 255
        k, ood = px[:, 0].round().long(), px[:, 1].round() >= 255
        logits = torch.zeros(x.shape[0], 1000)
        h = torch.as_tensor([self.index_of_code(int(c)) for c in k])
        logits[torch.arange(len(k)), h] = 10.0
        if self.distract:
            logits[torch.arange(len(k)), h + 1] = 20.0
        logits[ood] = 0.0
        return logits


def _solid(path, red, green=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), (red, green, 0), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def subset_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for k, wnid in enumerate(SUBSET):  # a 200-class subset, inside an archive's top folder
        _solid(root / "imagenet-a" / "imagenet-a" / wnid / "0.png", k)
    for k in range(0, 200, 20):  # clean val set (10 classes) and IN-C folder layout
        _solid(root / "clean" / "val" / SUBSET[k] / "0.png", k)
        for s in (1, 3):
            _solid(root / "inc" / "gaussian_noise" / str(s) / SUBSET[k] / "0.png", k)
    for i in range(12):  # OOD images (flat logits)
        _solid(root / "ino" / SUBSET[i] / f"{i}.png", 0, green=255)
    for k in range(5):  # ImageNet-v2 style: integer folder names are head indices
        _solid(root / "v2" / "imagenetv2-matched-frequency-format-val" / str(5 * k + 2) / "0.png", k)
    (root / "v2" / "imagenetv2-top-images-format-val").mkdir(parents=True)
    return root


def test_wnid_masking_on_a_200_class_subset(subset_folders):
    root = subset_folders
    opts = RobustnessOptions(dataset="none", imagenet_a_root=str(root / "imagenet-a"),
                             imagenet_r_root=str(root / "imagenet-a"), imagenet_sketch_root=str(root / "imagenet-a"),
                             benchmarks=["a", "r", "sketch"], batch_size=64, num_workers=0)
    logs = []
    res = RobustnessEvaluator(CodeModel(distract=True), HEAD_CLASSES, opts, 8, CPU, progress=False,
                              log=logs.append).run()
    r = res["results"]
    # Restricted to the 200 classes present the right class wins; over all 1000 the distractor does.
    assert r["imagenet_a"]["top1"] == 100.0 and r["imagenet_a"]["n"] == 200 and r["imagenet_a"]["classes"] == 200
    assert r["imagenet_r"]["top1"] == 100.0 and r["imagenet_r"]["masked"]
    assert r["imagenet_sketch"]["top1"] == 0.0 and not r["imagenet_sketch"]["masked"]
    assert r["imagenet_a"]["root"].endswith("imagenet-a/imagenet-a")
    assert res["table13"]["IN-A"] == 100.0 and res["table13"]["IN-S"] == 0.0 and res["table13"]["IN"] is None


def test_folders_v2_c_o_and_missing_benchmarks_are_skipped(subset_folders, tmp_path):
    root = subset_folders
    opts = RobustnessOptions(dataset="folder", root=str(root / "clean"), imagenet_v2_root=str(root / "v2"),
                             imagenet_c_root=str(root / "inc"), corruptions=["gaussian_noise", "fog"],
                             severities=[1, 3], imagenet_o_root=str(root / "ino"), imagenet_w_root=None,
                             watermark_on_the_fly=False, batch_size=64, num_workers=0)
    logs = []
    res = RobustnessEvaluator(CodeModel(distract=False), HEAD_CLASSES, opts, 8, CPU, progress=False,
                              log=logs.append).run()
    r, skipped = res["results"], res["skipped"]
    assert r["clean"]["top1"] == 100.0 and r["clean"]["n"] == 10
    assert r["imagenet_v2_mf"]["top1"] == 100.0 and r["imagenet_v2_mf"]["n"] == 5
    assert "imagenet_v2_ti" in skipped  # an empty variant folder: skipped with its reason
    assert "imagenet_v2_t07" in skipped and "T-0.7" in skipped["imagenet_v2_t07"]
    c = r["imagenet_c"]
    assert c["top1"] == 100.0 and c["missing"] == ["fog/1", "fog/3"]
    assert set(c["per_corruption"]["gaussian_noise"]) == {"1", "3"} and c["per_family"] == {"noise": 100.0}
    o = r["imagenet_o"]
    assert o["fpr95"] == 0.0 and o["auroc"] == 100.0 and o["n_ood"] == 12 and o["n_id"] == 10
    assert "not given" in skipped["imagenet_a"]
    assert "not given" in skipped["imagenet_r"] and "imagenet_r_root" in skipped["imagenet_r"]
    assert "not given" in skipped["imagenet_w"]
    assert any(line.startswith("skipped IN-A") for line in logs)
    # a folder given that does not exist is a typo, not a benchmark to skip: refused before any work
    opts.imagenet_a_root = str(tmp_path / "nowhere")
    with pytest.raises(SyncoError, match="imagenet_a_root"):
        RobustnessEvaluator(CodeModel(distract=False), HEAD_CLASSES, opts, 8, CPU, progress=False)
    assert find_v2_variants(root / "v2" / "imagenetv2-matched-frequency-format-val") == {
        "MF": root / "v2" / "imagenetv2-matched-frequency-format-val"}


def test_folder_without_head_classes_is_skipped_not_fatal(tmp_path, subset_folders):
    """With the default benchmarks (all), a folder that cannot be evaluated is skipped and says why; named in
    benchmarks=, it is an error (nothing written), as a benchmark asked for must run."""
    _solid(tmp_path / "bad" / "cat" / "0.png", 1)
    opts = RobustnessOptions(dataset="none", imagenet_sketch_root=str(tmp_path / "bad"),
                             imagenet_a_root=str(subset_folders / "imagenet-a"), num_workers=0)
    res = RobustnessEvaluator(CodeModel(distract=False), HEAD_CLASSES, opts, 8, CPU, progress=False,
                              log=lambda s: None).run()
    assert "is a class of the linear head" in res["skipped"]["imagenet_sketch"]
    assert res["results"]["imagenet_a"]["top1"] == 100.0
    opts.benchmarks = ["sketch", "a"]
    with pytest.raises(SyncoError, match="asks for sketch.*is a class of the linear head"):
        RobustnessEvaluator(CodeModel(distract=False), HEAD_CLASSES, opts, 8, CPU, progress=False,
                            log=lambda s: None).run()


def test_options_are_validated():
    with pytest.raises(SyncoError, match="unknown corruption"):
        RobustnessEvaluator(nn.Identity(), ["0"], RobustnessOptions(corruptions=["rain"]), 8, CPU)
    with pytest.raises(SyncoError, match="severities"):
        RobustnessEvaluator(nn.Identity(), ["0"], RobustnessOptions(severities=[0, 6]), 8, CPU)
    with pytest.raises(SyncoError, match="benchmark"):
        RobustnessEvaluator(nn.Identity(), ["0"], RobustnessOptions(benchmarks=["imagenet-z"]), 8, CPU)


def test_summary_and_table13_row():
    s = summarize_corruptions({"gaussian_noise": {1: 80.0, 5: 20.0}, "fog": {1: 60.0, 5: 40.0}}, "x", n=10)
    assert s["top1"] == 50.0 and s["per_family"] == {"noise": 50.0, "weather": 50.0}
    assert s["per_severity"] == {"1": 70.0, "5": 30.0}
    row = table13_row({"clean": {"top1": 70.0}, "imagenet_o": {"fpr95": 80.0}, "imagenet_c": s})
    assert list(row) == ["IN", "MF", "T-0.7", "TI", "IN-C", "IN-A", "IN-W", "IN-S", "IN-R", "IN-O"]
    assert row["IN"] == 70.0 and row["IN-O"] == 80.0 and row["IN-C"] == 50.0 and row["IN-A"] is None
    assert len(IMAGENET_C) == 15


# ---------------------------------------------------------------------------------------------
# On-the-fly corruptions on digits


class Flatten(nn.Module):
    num_features = 3 * 16 * 16

    def forward(self, x):
        return x.flatten(1)


def nearest_mean_head(x: torch.Tensor, y: torch.Tensor, num_classes: int = 10) -> LinearHead:
    """Closed-form linear classifier: logits_c = <x, mu_c> - |mu_c|^2 / 2 (nearest class mean)."""
    mu = torch.stack([x[y == c].mean(0) for c in range(num_classes)])
    head = LinearHead(x.shape[1], num_classes)
    head.linear.weight.data.copy_(mu)
    head.linear.bias.data.copy_(-0.5 * (mu * mu).sum(1))
    return head


@pytest.fixture(scope="module")
def digits_toy_classifier():
    """Pixels -> nearest class mean on the 16 px digits (~90% clean): an honest toy to corrupt."""
    from synco.data.digits import DigitsDataset

    ds = DigitsDataset("train", image_size=16)
    x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    head = nearest_mean_head(x.flatten(1), torch.as_tensor(ds.targets))
    return Classifier(Flatten(), head).eval()


def test_corruptions_on_digits_lower_accuracy_at_high_severity(digits_toy_classifier):
    opts = RobustnessOptions(dataset="digits", corruptions=["gaussian_noise", "defocus_blur", "fog", "contrast"],
                             severities=[1, 5], benchmarks=["clean", "c", "w"], max_images=120, num_workers=0,
                             batch_size=128)
    res = RobustnessEvaluator(digits_toy_classifier, [str(d) for d in range(10)], opts, 16, CPU, progress=False,
                              log=lambda s: None).run()
    r = res["results"]
    clean, c = r["clean"]["top1"], r["imagenet_c"]
    assert clean > 85 and r["clean"]["n"] == 120
    assert c["n"] == 120 and c["source"].startswith("generated")
    assert set(c["per_family"]) == {"noise", "blur", "weather", "digital"}
    assert c["per_severity"]["5"] < c["per_severity"]["1"] <= clean + 1e-9
    assert c["per_severity"]["5"] < clean - 20
    assert c["per_corruption"]["defocus_blur"]["5"] < c["per_corruption"]["defocus_blur"]["1"]
    assert c["top1"] == pytest.approx(np.mean([v for p in c["per_corruption"].values() for v in p.values()]))
    assert 0 <= r["imagenet_w"]["top1"] <= 100 and r["imagenet_w"]["source"].startswith("generated")
    assert res["table13"]["IN-C"] == c["top1"]


def test_generated_corruptions_are_seeded_per_sample():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8))
    state = np.random.get_state()
    for name in ("gaussian_noise", "impulse_noise", "frost", "elastic_transform"):
        a, b = Corruption(name, 3)(img, 7), Corruption(name, 3)(img, 7)
        assert a.dtype == torch.uint8 and a.shape == img.shape
        assert torch.equal(a, b), name
        assert not torch.equal(a, Corruption(name, 3)(img, 8)), name
    assert all(np.array_equal(x, y) for x, y in zip(state[1:2], np.random.get_state()[1:2]))
    assert Watermark(16)(img, 0).shape == img.shape


def test_clean_view_matches_the_eval_transform(digits_folder):
    from synco.data.folder import SafeImageFolder
    from synco.data.transforms import eval_transform

    base = SafeImageFolder(digits_folder / "val")
    view = BenchmarkView(base, [0, 5], center_crop_ops(24, 224 / 256))
    ref = SafeImageFolder(digits_folder / "val", transform=eval_transform(24))
    assert torch.equal(view[1][0], ref[5][0]) and view[1][1] == ref[5][1]


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_robustness_on_digits(tmp_path):
    from synco.cli.main import main

    torch.manual_seed(0)
    head = LinearHead(96, 10)
    save_head(head, tmp_path / "linear_head.pt", [str(d) for d in range(10)], {"backbone": "vit_tiny_patch16_224"}, 16)
    rc = main(["eval", "robustness", "--checkpoint", "random", "--linear-head", str(tmp_path), "--out",
               str(tmp_path / "out"), "--no-progress", "--max-images", "24", "backbone=cpu-demo", "dataset=digits",
               "device=cpu", "num_workers=0", "corruptions=[gaussian_noise, pixelate]", "severities=[2]"])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert result["results"]["clean"]["n"] == 24 and result["image_size"] == 16
    assert set(result["results"]["imagenet_c"]["per_corruption"]) == {"gaussian_noise", "pixelate"}
    assert "not given" in result["skipped"]["imagenet_r"]
    assert result["table13"]["IN-W"] is not None and result["table13"]["IN-A"] is None
    assert main(["eval", "robustness", "--checkpoint", "random", "--linear-head", str(tmp_path / "none.pt"),
                 "backbone=cpu-demo", "device=cpu"]) == 2
