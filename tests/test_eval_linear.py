"""Linear probing: the one-pass LR grid, head selection, resume, and `synco eval linear` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from synco.cli.main import main
from synco.data.transforms import eval_transform, train_classification_transform
from synco.errors import SyncoError
from synco.eval.grid import GridTrainer, select_best
from synco.eval.head import Classifier, load_head
from synco.eval.linear import LinearHParams, linear_probe
from synco.eval.probe import ProbeData, batch_scaled_lr, check_recipe, epoch_batches, steps_per_epoch
from synco.io import load_torch_file as load_ckpt

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Toy data: features with a linear answer, and images whose mean colour gives the class


def separable_features(n_per_class=40, dim=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:classes] * 4.0
    x = torch.cat([centers[c] + 0.5 * torch.randn(n_per_class, dim, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


class ColourImages(torch.utils.data.Dataset):
    """Noisy 16x16 images whose dominant channel is the class (red, green, blue)."""

    classes = ["red", "green", "blue"]

    def __init__(self, n_per_class: int, seed: int, transform=None):
        rng = np.random.default_rng(seed)
        self.images, self.targets = [], []
        for c in range(3):
            for _ in range(n_per_class):
                img = rng.integers(0, 90, (16, 16, 3))
                img[..., c] += 130
                self.images.append(img.astype(np.uint8))
                self.targets.append(c)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


class MeanColour(nn.Module):
    """A fixed 'backbone': the mean of each channel (3 features), linearly separable on ColourImages."""

    num_features = 3

    def forward(self, x):
        return x.mean(dim=(2, 3))


def colour_data(n_train=20, n_test=8) -> ProbeData:
    t_test = eval_transform(16, crop_ratio=1.0)
    return ProbeData(ColourImages(n_train, 0, train_classification_transform(16)), ColourImages(n_train, 0, t_test),
                     ColourImages(n_test, 1, t_test), ColourImages.classes, ColourImages(n_train, 0).targets,
                     name="colours")


META = {"backbone": "mean-colour", "num_features": 3}


def probe(out, hp, data=None, batch_size=16, on_epoch=None):
    return linear_probe(MeanColour(), META, data or colour_data(), out, hp, batch_size=batch_size, num_workers=0,
                        seed=0, device=CPU, image_size=16, checkpoint="test", progress=False, on_epoch=on_epoch)


# ---------------------------------------------------------------------------------------------
# The grid trainer on features


def _train(trainer, x, y, epochs, batch, seed=0):
    for epoch in range(epochs):
        for b in epoch_batches(len(x), batch, seed, epoch):
            trainer.step(x[b], y[b])


def test_grid_trainer_recovers_a_linearly_separable_problem():
    x, y = separable_features()
    xt, yt = separable_features(seed=1)
    hp = LinearHParams(epochs=15, warmup_epochs=1, label_smoothing=0.1)
    trainer = GridTrainer(8, 4, [0.1, 1.0], hp, steps_per_epoch(len(x), 32))
    _train(trainer, x, y, hp.epochs, 32)
    m = trainer.evaluate(xt, yt)
    assert m["top1"] == [100.0, 100.0]
    assert m["top5"] == [100.0, 100.0]
    assert trainer.step_count == hp.epochs * 5
    # cosine decay reaches ~0 at the end; warm-up starts at 0
    assert trainer.optimizer.param_groups[1]["lr"] < 0.05


@pytest.mark.parametrize("bn", [False, True])
def test_one_pass_grid_equals_training_each_head_alone(bn):
    x, y = separable_features(n_per_class=20, dim=6, classes=3)
    hp = LinearHParams(epochs=3, warmup_epochs=1, bn=bn, nesterov=True)
    lrs = [0.1, 0.75, 1.5]
    grid = GridTrainer(6, 3, lrs, hp, steps_per_epoch(len(x), 16))
    _train(grid, x, y, hp.epochs, 16)
    for g, lr in enumerate(lrs):
        solo = GridTrainer(6, 3, [lr], hp, steps_per_epoch(len(x), 16))
        _train(solo, x, y, hp.epochs, 16)
        torch.testing.assert_close(grid.model.weights[g], solo.model.weights[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grid.model.biases[g], solo.model.biases[0], rtol=1e-5, atol=1e-6)
        assert not torch.equal(solo.model.weights[0], GridTrainer(6, 3, [lr], hp, 1).model.weights[0])  # it learned
    if bn:
        assert grid.model.bn.num_batches_tracked == hp.epochs * steps_per_epoch(len(x), 16)


def test_select_best_uses_heldout_then_loss_then_epoch():
    h = [{"epoch": 1, "heldout": {"top1": [50.0, 70.0], "loss": [1.0, 0.9]}, "test": {"top1": [60.0, 10.0], "loss": [1, 1]}},
         {"epoch": 2, "heldout": {"top1": [80.0, 80.0], "loss": [0.5, 0.4]}, "test": {"top1": [99.0, 20.0], "loss": [1, 1]}},
         {"epoch": 3, "heldout": {"top1": [75.0, 80.0], "loss": [0.5, 0.4]}, "test": {"top1": [30.0, 40.0], "loss": [1, 1]}}]
    assert select_best(h) == (1, 3)  # tie on accuracy and loss: the later epoch
    h[2]["heldout"]["loss"][1] = 0.6
    assert select_best(h) == (1, 2)  # tie on accuracy: lower loss wins, never the test score
    assert select_best(h, use_heldout=False) == (1, 3)


# ---------------------------------------------------------------------------------------------
# The probe on images


def test_probe_on_images_recovers_the_classes_and_saves_the_selected_head(tmp_path):
    res = probe(tmp_path, LinearHParams(epochs=8, warmup_epochs=1, lrs=[0.5, 1.0], val_fraction=0.2))
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert res["n_train"] + res["n_heldout"] == 60 and res["n_heldout"] == 12 and res["n_test"] == 24
    assert res["selected_on"] == "heldout" and res["mode"] == "augmented every epoch"
    # the selected head has the best held-out accuracy of the grid
    g = res["best"]["head"]
    assert res["grid"][g]["heldout_top1"] == max(r["heldout_top1"] for r in res["grid"])
    assert res["best"]["epoch"] == res["grid"][g]["epoch"]
    # linear_head.pt holds that head: backbone + head reproduce the reported test accuracy
    head, state = load_head(tmp_path / "linear_head.pt", expect_dim=3)
    assert state["classes"] == ColourImages.classes and state["image_size"] == 16
    data = colour_data()
    model = Classifier(MeanColour(), head).eval()
    with torch.no_grad():
        x = torch.stack([data.test[i][0] for i in range(len(data.test))])
        acc = 100.0 * float((model(x).argmax(1) == torch.tensor(data.test.targets)).float().mean())
    assert acc == pytest.approx(res["top1"])


def test_selection_ignores_a_head_that_cannot_learn(tmp_path):
    res = probe(tmp_path, LinearHParams(epochs=3, warmup_epochs=0, lrs=[1e-6, 1.0], val_fraction=0.2,
                                        label_smoothing=0.0))
    assert res["best"]["head"] == 1 and res["best"]["base_lr"] == 1.0
    assert res["grid"][0]["heldout_top1"] < res["grid"][1]["heldout_top1"]


def test_grid_pipeline_equals_a_single_head_run(tmp_path):
    hp = dict(epochs=3, warmup_epochs=1, val_fraction=0.2)
    grid = probe(tmp_path / "grid", LinearHParams(lrs=[0.5, 1.0], **hp))
    solo = probe(tmp_path / "solo", LinearHParams(lrs=[1.0], **hp))
    for a, b in zip(grid["history"], solo["history"]):
        assert a["test"]["top1"][1] == pytest.approx(b["test"]["top1"][0])
        assert a["train_loss"][1] == pytest.approx(b["train_loss"][0], rel=1e-5)
    wg = load_ckpt(tmp_path / "grid" / "linear_ckpt.pt")["trainer"]["model"]["weights.1"]
    ws = load_ckpt(tmp_path / "solo" / "linear_ckpt.pt")["trainer"]["model"]["weights.0"]
    torch.testing.assert_close(wg, ws, rtol=1e-5, atol=1e-6)


def test_killed_run_resumes_to_the_same_heads(tmp_path):
    hp = LinearHParams(epochs=4, warmup_epochs=1, lrs=[0.5, 1.0], val_fraction=0.2, bn=True)
    full = probe(tmp_path / "full", hp)

    def kill(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probe(tmp_path / "killed", hp, on_epoch=kill)
    assert load_ckpt(tmp_path / "killed" / "linear_ckpt.pt")["epoch"] == 2
    assert not (tmp_path / "killed" / "linear_head.pt").exists()
    resumed = probe(tmp_path / "killed", hp)
    a = load_ckpt(tmp_path / "full" / "linear_ckpt.pt")["trainer"]
    b = load_ckpt(tmp_path / "killed" / "linear_ckpt.pt")["trainer"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["step"] == b["step"]
    assert resumed["history"] == full["history"] and resumed["best"] == full["best"]
    ha = torch.load(tmp_path / "full" / "linear_head.pt", weights_only=True)
    hb = torch.load(tmp_path / "killed" / "linear_head.pt", weights_only=True)
    assert torch.equal(ha["weight"], hb["weight"]) and torch.equal(ha["bn_mean"], hb["bn_mean"])
    # resuming with other settings is refused, naming the setting
    with pytest.raises(SyncoError, match="epochs"):
        probe(tmp_path / "killed", LinearHParams(epochs=5, warmup_epochs=1, lrs=[0.5, 1.0], val_fraction=0.2, bn=True))


def test_cached_features_mode_and_selection_on_test(tmp_path):
    res = probe(tmp_path, LinearHParams(epochs=6, warmup_epochs=1, lrs=[1.0], val_fraction=0.0, cache_features=True))
    assert res["mode"].startswith("cached") and res["selected_on"] == "test" and res["n_heldout"] == 0
    assert res["top1"] == 100.0 and res["best"]["epoch"] == 6 and res["last"]["top1"] == res["top1"]


def test_options_are_checked():
    with pytest.raises(SyncoError, match="'lrs'"):
        check_recipe(LinearHParams(lrs=[]))
    with pytest.raises(SyncoError, match="'warmup_epochs'"):
        check_recipe(LinearHParams(epochs=2, warmup_epochs=5))
    assert batch_scaled_lr(1.0, 512, 256) == 2.0 and batch_scaled_lr(1.0, 512, 0) == 1.0


# ---------------------------------------------------------------------------------------------
# `synco eval linear`


def test_cli_linear_on_folder_with_random_backbone(tmp_path, digits_folder, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "linear", "--checkpoint", "random", "--out", str(out), "--no-progress", "backbone=cpu-demo",
               "dataset=folder", f"root={digits_folder}", "epochs=2", "warmup_epochs=1", "batch_size=64",
               "num_workers=0", "device=cpu", "lrs=[0.5, 1.0]", "cache_features=true"])
    assert rc == 0
    res = json.loads((out / "linear.json").read_text())
    assert res["protocol"] == "linear" and res["n_train"] + res["n_heldout"] == 200 and res["n_test"] == 100
    assert res["report"] == {"Linear top-1": res["top1"], "Linear top-5": res["top5"]}
    assert res["lr_scale"] == 0.25 and [r["lr"] for r in res["grid"]] == [0.125, 0.25]
    assert "| * |" in capsys.readouterr().out
    head, _ = load_head(out, expect_dim=96)
    assert head.linear.weight.shape == (10, 96)


def test_cli_linear_reports_bad_options(tmp_path, capsys):
    rc = main(["eval", "linear", "device=cpu", "--checkpoint", "random", "backbone=cpu-demo", "--out", str(tmp_path),
               "val_fraction=1.5"])
    assert rc == 2 and "val_fraction" in capsys.readouterr().err
