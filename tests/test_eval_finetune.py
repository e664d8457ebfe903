"""Fine-tuning: the recipe of SynCo-v2 7.6, learning, resume, and `synco eval finetune` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from test_eval_linear import MeanColour, colour_data  # the toy data of the linear tests

import synco.eval.finetune as FT
from synco.cli.main import main
from synco.eval.finetune import FinetuneHParams, FinetuneModel, finetune
from synco.io import load_torch_file as load

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """A trainable 'backbone': mean colour -> linear -> GELU (8 features), with a LayerNorm and a bias
    to check which parameters get weight decay."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mean = MeanColour()
        self.fc = nn.Linear(3, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(self.fc(self.mean(x))))


META = {"backbone": "tiny", "num_features": 8}


def run(out, hp, batch_size=15, on_epoch=None):
    return finetune(TinyNet(), META, colour_data(), out, hp, batch_size=batch_size, num_workers=0, seed=0, device=CPU,
                    image_size=16, checkpoint="test", progress=False, on_epoch=on_epoch)


def test_finetuning_learns_the_toy_problem(tmp_path):
    res = run(tmp_path, FinetuneHParams(epochs=12, warmup_epochs=1, lr=0.5, lr_batch_ref=0))
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert res["epoch"] == 12 and res["n_train"] == 60 and res["n_test"] == 24
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]
    # every weight moved, the backbone's included
    state = load(tmp_path / "finetune_ckpt.pt")["model"]
    assert not torch.allclose(state["backbone.fc.weight"], TinyNet().fc.weight)


def test_the_recipe(tmp_path, monkeypatch):
    """SGD momentum 0.9 (no Nesterov), wd 1e-4 on weights only, warm-up then cosine, dropout 0.1 before the
    classifier, label smoothing 0.1, gradient clipping at 1.0."""
    hp = FinetuneHParams(epochs=3, warmup_epochs=2)
    assert (hp.lr, hp.weight_decay, hp.momentum, hp.dropout, hp.label_smoothing, hp.clip_grad, hp.epochs,
            hp.warmup_epochs) == (1e-3, 1e-4, 0.9, 0.1, 0.1, 1.0, 3, 2)
    assert FinetuneHParams().epochs == 100 and FinetuneHParams().warmup_epochs == 10

    model = FinetuneModel(TinyNet(), 3, hp.dropout)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.1
    opt = FT.create_finetune_optimizer(model, hp, 1e-3)
    assert isinstance(opt, torch.optim.SGD)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model.backbone.fc.weight)] == 1e-4 and decay[id(model.head.weight)] == 1e-4
    assert decay[id(model.backbone.fc.bias)] == 0 and decay[id(model.backbone.norm.weight)] == 0
    assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in opt.param_groups)

    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        clips.append(max_norm)
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    res = run(tmp_path, hp, batch_size=15)  # 60 images: 4 steps per epoch
    assert clips == [1.0] * 12
    lrs = [h["lr"] for h in res["history"]]  # lr of each epoch's last step
    assert lrs[0] == pytest.approx(1e-3 * 15 / 256 * 3 / 8)  # step 3 of an 8-step linear warm-up
    assert lrs[1] == pytest.approx(1e-3 * 15 / 256 * 7 / 8)
    assert 0 < lrs[2] < lrs[1]  # cosine decay


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    hp = FinetuneHParams(epochs=3, warmup_epochs=1, lr=0.5, lr_batch_ref=0)
    full = run(tmp_path / "full", hp)

    def kill(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", hp, on_epoch=kill)
    assert load(tmp_path / "killed" / "finetune_ckpt.pt")["epoch"] == 1
    resumed = run(tmp_path / "killed", hp)
    a, b = load(tmp_path / "full" / "finetune_ckpt.pt"), load(tmp_path / "killed" / "finetune_ckpt.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["history"] == full["history"]


def test_cli_finetune_on_imagefolder_with_random_backbone(tmp_path, tiny_imagefolder, capsys):
    out = tmp_path / "ft"
    rc = main(["eval", "finetune", "--checkpoint", "random", "--out", str(out), "--no-progress",
               "backbone=cpu-demo", "dataset=folder", f"root={tiny_imagefolder}", "epochs=2", "warmup_epochs=1",
               "batch_size=6", "num_workers=0", "device=cpu"])
    assert rc == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["protocol"] == "finetune" and res["n_train"] == 18 and res["n_test"] == 9 and res["epochs"] == 2
    assert res["report"] == {"Fine-tune top-1": res["top1"], "Fine-tune top-5": res["top5"]}
    assert 0 <= res["top1"] <= 100 and res["top5"] == 100.0  # 3 classes: top-5 holds them all
    assert (out / "finetune_ckpt.pt").exists()
    assert "test top1" in capsys.readouterr().out
