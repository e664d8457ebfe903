"""Adversarial evaluation: attacks with the paper's settings on [0, 1] inputs, eps balls, accuracy drop, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from synco.errors import SyncoError
from synco.eval.adversarial import (
    ATTACKS,
    EPS,
    NormalizedClassifier,
    attack_accuracy,
    create_attack,
    parse_attacks,
    table14_row,
)
from synco.eval.head import Classifier, LinearHead, save_head

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


class Flatten(nn.Module):
    num_features = 3 * 16 * 16

    def forward(self, x):
        return x.flatten(1)


def _digits01(split: str):
    from synco.data.digits import DigitsDataset

    ds = DigitsDataset(split, image_size=16)
    return torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255, torch.as_tensor(ds.targets)


@pytest.fixture(scope="module")
def toy():
    """Normalise -> pixels -> linear least-squares classifier (ridge to one-hot labels, closed form) on 16 px
    digits: a trained toy model (~97% clean) with no robustness of its own, and 64 test images in [0, 1]."""
    x, y = _digits01("train")
    f = ((x - MEAN) / STD).flatten(1).double()
    fa = torch.cat([f, torch.ones(len(f), 1, dtype=torch.double)], 1)
    w = torch.linalg.solve(fa.T @ fa + torch.eye(fa.shape[1], dtype=torch.double),
                           fa.T @ nn.functional.one_hot(y, 10).double()).float()
    head = LinearHead(f.shape[1], 10)
    head.linear.weight.data.copy_(w[:-1].T)
    head.linear.bias.data.copy_(w[-1])
    model = NormalizedClassifier(Classifier(Flatten(), head)).eval()
    xt, yt = _digits01("test")
    return model, xt[:64], yt[:64]


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def test_normalized_classifier_normalises_inside():
    inner = nn.Conv2d(3, 2, 1)
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(NormalizedClassifier(inner)(x), inner((x - MEAN) / STD))


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_fast_attacks_stay_in_the_eps_ball_and_lower_accuracy(toy, name):
    model, x, y = toy
    torch.manual_seed(0)
    clean = _acc(model, x, y)
    adv = create_attack(name, model, 10)(x, y)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert (adv - x).abs().max() > EPS / 2  # it really moved
    assert clean > 80
    assert _acc(model, adv, y) < clean - 30


def test_attack_accuracy_reports_clean_and_each_attack(toy):
    model, x, y = toy
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:32], y[:32]), batch_size=16)
    res = attack_accuracy(model, loader, ["fgsm", "pgd"], 10, torch.device("cpu"), progress=False, log=lambda s: None)
    assert res["clean"]["n"] == 32 and res["clean"]["top1"] == pytest.approx(_acc(model, x[:32], y[:32]))
    for name in ("fgsm", "pgd"):
        assert res[name]["n"] == 32 and res[name]["max_linf"] <= EPS + 1e-6
        assert res[name]["top1"] < res["clean"]["top1"]
    row = table14_row(res)
    assert list(row) == ["Clean", "FGSM", "PGD", "C&W", "Square", "Auto", "TIFGSM", "OnePixel"]
    assert row["C&W"] is None and row["FGSM"] == res["fgsm"]["top1"]


def test_attacks_are_built_with_the_papers_settings(toy):
    model = toy[0]
    a = {name: create_attack(name, model, 1000, seed=3) for name in ATTACKS}
    assert a["fgsm"].eps == EPS == 8 / 255
    assert (a["pgd"].eps, a["pgd"].alpha, a["pgd"].steps, a["pgd"].random_start) == (8 / 255, 2 / 255, 10, True)
    assert (a["cw"].c, a["cw"].kappa, a["cw"].steps, a["cw"].lr) == (1e-4, 0, 50, 0.01)
    assert (a["square"].norm, a["square"].eps, a["square"].n_queries, a["square"].seed) == ("Linf", 8 / 255, 1000, 3)
    assert (a["autoattack"].norm, a["autoattack"].eps, a["autoattack"].version) == ("Linf", 8 / 255, "standard")
    targeted = [s for s in a["autoattack"]._autoattack.attacks if hasattr(s, "n_target_classes")]
    assert len(targeted) == 2 and all(s.n_target_classes == 9 for s in targeted)
    assert (a["tifgsm"].eps, a["tifgsm"].alpha, a["tifgsm"].steps) == (8 / 255, 2 / 255, 10)
    assert (a["onepixel"].pixels, a["onepixel"].steps) == (1, 10)


def test_parse_attacks():
    assert parse_attacks("FGSM, pgd,auto,c&w") == ["fgsm", "pgd", "autoattack", "cw"]
    assert parse_attacks(["pgd", "pgd"]) == ["pgd"]
    with pytest.raises(SyncoError, match="unknown attack"):
        parse_attacks("fgsm,deepfool")
    with pytest.raises(SyncoError):
        parse_attacks("")


def test_cli_adversarial_subset(tmp_path):
    from synco.cli.main import main

    torch.manual_seed(0)
    save_head(LinearHead(96, 10), tmp_path / "linear_head.pt", [str(d) for d in range(10)], {}, 16)
    rc = main(["eval", "adversarial", "--checkpoint", "random", "--linear-head", str(tmp_path / "linear_head.pt"),
               "--out", str(tmp_path / "out"), "--no-progress", "--attacks", "fgsm,pgd", "--max-images", "12",
               "backbone=cpu-demo", "dataset=digits", "device=cpu", "num_workers=0"])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "adversarial.json").read_text())
    assert set(result["results"]) == {"clean", "fgsm", "pgd"} and result["results"]["clean"]["n"] == 12
    assert result["results"]["pgd"]["max_linf"] <= EPS + 1e-6
    assert result["table14"]["Square"] is None and result["torchattacks"] == "3.3.0"
    assert main(["eval", "adversarial", "--checkpoint", "random", "--linear-head", str(tmp_path),
                 "--attacks", "nope", "backbone=cpu-demo", "device=cpu"]) == 2
