"""The pretraining engine end to end: outputs, exact resume, NaN stop, clear errors."""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from synco.cli.main import main
from synco.config import load_config
from synco.engine.train import Trainer, stop_at_step
from synco.io import load_torch_file as load
from synco.options import layer_overrides
from synco.pretrain import pretrain


def run_cli(*args):
    return main(["pretrain", "--no-progress", *args])


def test_cli_run_writes_every_output(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides if not o.startswith("knn_at_end")]
    rc = run_cli("--out", str(out), *overrides, "knn.max_train=64", "knn.max_test=64", "knn.k=[5,20]")
    assert rc == 0
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "backbone.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "backbone", "epochs", "knn_top1", "knn_top1_random_init", "knn_top1_pixels",
                "images_per_second"):
        assert key in summary
    assert 0 <= summary["knn_top1"] <= 100 and summary["images_per_second"] > 0
    # every number the summary holds is one a sweep may name in metrics: and checks when it reads the file back
    from synco.pretrain import SUMMARY_NUMBERS

    numbers = {k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers <= set(SUMMARY_NUMBERS), numbers - set(SUMMARY_NUMBERS)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 128 images / 32 = 4 steps x 2 epochs
    for key in ("loss", "lr", "momentum", "synthetic", "pos_cos", "hardest_neg_cos", "synthetic_cos",
                "images_per_second", "frac_queue_above_pos", "frac_synthetic_above_pos",
                "synthetic_cos_interpolate", "synthetic_cos_signed_gradient_step"):
        assert key in steps[-1]
    # the EMA after optimizer step t uses m(t), t counted from 1 (MoBY), so the last step reaches m = 1
    from synco.schedules import momentum_at
    m0 = load_config("cpu-demo").contrast.momentum_start
    assert [r["momentum"] for r in steps] == pytest.approx([momentum_at(t, 8, m0) for t in range(1, 9)])
    assert steps[-1]["momentum"] == 1.0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["batch_size"] == 32 and saved["method"] == "synco"
    assert (out / "tb").is_dir()


def test_knn_monitor_logs_a_learning_curve(tmp_path, tiny_overrides):
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, ["epochs=3", "knn_every=2", "knn_at_end=true", "knn.max_train=64",
                                                    "knn.max_test=32", "knn.k=[5]"]))
    pretrain(cfg, tmp_path, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["epoch"], r["knn_top1"]) for r in recs if "knn_top1" in r]
    assert [e for e, _ in curve] == [1, 2]  # every 2 epochs, and always after the last one
    assert all(0 <= v <= 100 for _, v in curve)
    # the monitor evaluates the same backbone as the end-of-run k-NN, so the last point equals it
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert curve[-1][1] == pytest.approx(summary["knn_top1"])
    assert summary["knn_curve"] == [[e + 1, v] for e, v in curve]
    # K = 128 queue entries + 24 synthetic (window covers the last epoch here), summed over both views
    assert summary["chance_loss"] == pytest.approx(2 * math.log(1 + 128 + 24))
    last = [r for r in recs if "loss" in r][-1]
    assert (summary["final_loss"], summary["pos_cos"]) == (last["loss"], last["pos_cos"])


def test_synthetic_window_in_metrics(tmp_path, tiny_overrides):
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, ["epochs=4", "negatives.warmup_epochs=1",
                                                    "negatives.cooldown_epochs=1"]))
    Trainer(cfg, tmp_path, progress=False).train()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    active = {r["epoch"]: r["synthetic"] for r in recs if "loss" in r}
    assert active == {0: 0, 1: 1, 2: 1, 3: 0}
    assert all(("synthetic_cos" in r) == bool(r["synthetic"]) for r in recs if "loss" in r)


def _weights(path):
    return load(path)["model"]


@pytest.mark.parametrize("stop_at,augment_on", [(4, "workers"), (6, "workers"), (6, "device")])  # epoch end, mid-epoch
def test_resume_gives_the_same_weights_as_one_run(tmp_path, tiny_overrides, stop_at, augment_on):
    over = layer_overrides(tiny_overrides, ["epochs=3", "deterministic=true", "negatives.warmup_epochs=1", "optim.warmup_epochs=1",
                             f"data.augment.on={augment_on}"])
    cfg = load_config("cpu-demo", over)
    Trainer(cfg, tmp_path / "full", progress=False).train()
    split = Trainer(cfg, tmp_path / "split", progress=False, step_hooks=(stop_at_step(stop_at),))
    split.train()
    assert load(tmp_path / "split" / "checkpoint.pt")["step"] == stop_at
    again = Trainer(cfg, tmp_path / "split", progress=False)
    assert again.train()["resumed"]
    a, b = _weights(tmp_path / "full" / "checkpoint.pt"), _weights(tmp_path / "split" / "checkpoint.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    split_log = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    key = lambda recs: [(r["step"], r.get("lr"), r.get("momentum")) for r in recs if "loss" in r]
    assert key(full) == key(split_log)  # schedules continued from the true step, no duplicate records


@pytest.mark.slow  # two `synco pretrain` processes, 80 steps: ~13 s on 2 busy cores
def test_sigkill_then_same_command_resumes(tmp_path, tiny_overrides):
    """SIGKILL in the middle of a run (during step 5, after the checkpoint of epoch 2 at step 4), then the very same
    command resumes from that checkpoint and finishes with every step logged once. The kill waits for a handshake
    (the run paused inside step 5 and the step-4 checkpoint on disk), not for a clock."""
    from conftest import paused_synco, wait_for

    out = tmp_path / "run"
    args = ["pretrain", "--no-progress", "--out", str(out), *layer_overrides(tiny_overrides, ["epochs=40", "data.max_images=64"])]
    ckpt, ready = out / "checkpoint.pt", tmp_path / "paused"
    proc = paused_synco(args, step=5, until="kill", ready=ready, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    try:
        wait_for(ready.exists, "pause at step 5", proc)
        wait_for(lambda: ckpt.exists() and load(ckpt)["step"] == 4, "checkpoint of step 4", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load(ckpt)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 2, 0)
    done = subprocess.run([sys.executable, "-m", "synco", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    final = load(ckpt)
    assert final["step"] == 80 and final["epoch"] == 40
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 81))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides, monkeypatch, capsys):
    from synco.models import method

    original = method.SelfSupervisedModel.loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        loss, stats, keys = original(self, *a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 5 else loss), stats, keys

    monkeypatch.setattr(method.SelfSupervisedModel, "loss", poisoned)
    rc = run_cli("--out", str(tmp_path), *layer_overrides(tiny_overrides, ["epochs=3"]))
    err = capsys.readouterr().err
    assert rc == 2 and "NaN" in err and "epoch 1" in err and "Traceback" not in err
    state = load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("overrides, needle", [
    (["data.dataset=folder", "data.root=/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["contrast.queue_size=100"], "multiple of the global batch"),
    (["optim.batch_size=256", "contrast.queue_size=256"], "fewer than one optimizer step"),
    (["negatives.n_hard=1000"], "negatives.n_hard"),
])
def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, tiny_overrides, capsys, overrides, needle):
    rc = run_cli("--out", str(tmp_path / "r"), *layer_overrides(tiny_overrides, [*overrides]))
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_unknown_preset_and_empty_class_folder(tmp_path, tiny_overrides, capsys):
    assert main(["pretrain", "--config", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    root = tmp_path / "data" / "train"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(root / "a" / "x.png")
    assert run_cli("--out", str(tmp_path / "r"), *layer_overrides(tiny_overrides, ["data.dataset=folder",
                   f"data.root={tmp_path / 'data'}"])) == 2
    assert "Class folder(s) b" in capsys.readouterr().err


def test_resume_refuses_another_backbone_or_config(tmp_path, tiny_overrides, capsys):
    assert run_cli("--out", str(tmp_path), *layer_overrides(tiny_overrides, ["epochs=1"])) == 0
    rc = run_cli("--out", str(tmp_path), *layer_overrides(tiny_overrides, ["epochs=1", "model.backbone=vit_small_patch16_224"]))
    assert rc == 2 and "vit_small_patch16_224" in capsys.readouterr().err
    rc = run_cli("--out", str(tmp_path), *layer_overrides(tiny_overrides, ["epochs=1", "contrast.temperature=0.1"]))
    assert rc == 2 and "contrast.temperature" in capsys.readouterr().err
    rc = run_cli("--out", str(tmp_path), *layer_overrides(tiny_overrides, ["epochs=1", "resume=false"]))
    assert rc == 2 and "already holds a checkpoint" in capsys.readouterr().err


def test_a_checkpoint_from_before_new_config_fields_resumes(tmp_path, tiny_overrides):
    """A checkpoint whose saved config lacks the sections added since (the hard-negative strategies, timed
    checkpoints) resumes: every added field is off by default, so it is not a change of settings."""
    import torch as _torch

    from synco.io import atomic_save

    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, ["epochs=2"]))
    Trainer(cfg, tmp_path, progress=False, step_hooks=(stop_at_step(2),)).train()
    state = load(tmp_path / "checkpoint.pt")
    old = state["config"]
    old.pop("fnc"), old.pop("ckpt_every_minutes")
    for key in ("reweight", "beta", "tau_plus"):
        old["contrast"].pop(key)
    old["negatives"].pop("skip_top")
    atomic_save(state, tmp_path / "checkpoint.pt")
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.train()["resumed"] and trainer.state.step == 8
    assert _torch.isfinite(trainer.model.queue.queue1).all()


def test_corrupt_image_is_skipped_and_counted(tmp_path, tiny_imagefolder, tiny_overrides):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    victim = next((root / "train").rglob("*.jpg"))
    victim.write_bytes(b"garbage")
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, [
        "data.dataset=folder", f"data.root={root}", "optim.batch_size=6", "contrast.queue_size=12",
        "negatives.n_hard=4", "epochs=1", "knn_at_end=true", "knn.k=[3]"]))
    summary = pretrain(cfg, tmp_path / "run", progress=False)
    assert summary["bad_images"] == 1 and 0 <= summary["knn_top1"] <= 100
    assert str(victim) in (tmp_path / "run" / "bad_images.txt").read_text()


def test_mixed_sampler_honours_the_ratio():
    from torch.utils.data import ConcatDataset, TensorDataset

    from synco.engine.data import GlobalBatchSampler, mix_counts

    real, syn = TensorDataset(torch.zeros(100)), TensorDataset(torch.zeros(30))
    ds = ConcatDataset([real, syn])
    for ratio, mode, expect in [(0.5, "replace", (50, 50)), (1.0, "replace", (0, 100)),
                                (0.5, "add", (100, 100)), (0.0, "replace", (100, 0))]:
        n_real, n_syn = mix_counts(100, ratio, mode)
        assert (n_real, n_syn) == expect
        seen = []
        for rank in range(2):
            s = GlobalBatchSampler(ds, 10, counts=(n_real, n_syn), num_replicas=2, rank=rank, shuffle=True,
                                   seed=0, drop_last=True)
            s.set_epoch(3)
            seen += [i for _, i in s]  # the sampler yields (epoch, index)
        assert sum(i >= 100 for i in seen) == n_syn and sum(i < 100 for i in seen) == n_real
        assert len(set(i for i in seen if i < 100)) == n_real  # real images without repetition


def test_global_batches_are_the_same_for_any_number_of_processes():
    from torch.utils.data import TensorDataset

    from synco.engine.data import GlobalBatchSampler

    ds = TensorDataset(torch.zeros(50))
    one = GlobalBatchSampler(ds, 8, num_replicas=1, rank=0, seed=0, drop_last=True)
    two = [GlobalBatchSampler(ds, 4, num_replicas=2, rank=r, seed=0, drop_last=True) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(5)
    a, (b0, b1) = list(one), [list(s) for s in two]
    assert len(a) == 48 and len(b0) == len(b1) == 24
    merged = [i for step in range(6) for i in b0[4 * step:4 * step + 4] + b1[4 * step:4 * step + 4]]
    assert merged == a  # rank blocks, gathered in rank order, rebuild the single-process batch
    one.set_epoch(6)
    assert list(one) != a


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, tiny_overrides):
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, ["optim.accum_steps=2", "optim.batch_size=16"]))
    trainer = Trainer(cfg, tmp_path, progress=False)
    result = trainer.train()
    # 128 images / 16 = 8 micro-batches per epoch -> 4 optimizer steps per epoch, 2 epochs
    assert result["steps"] == trainer.total_steps == 8
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in recs)
    # the queue received every micro-batch's keys: 16 micro-batches x 16 keys, modulo its 128 slots
    assert int(trainer.model.queue.ptr) == (16 * 16) % 128


class RecordingSGD(torch.optim.SGD):
    """Plain SGD (its step scales with the gradient, unlike Adam's), keeping the gradients it was handed."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def _accumulation_case(tiny_overrides, method):
    import copy

    from synco.models.method import create_model

    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, [f"method={method}", "model.drop_path_online=0.0",
                                                    "contrast.queue_size=32"]))
    torch.manual_seed(0)
    model = create_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    micro = [tuple(torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)) for _ in range(2)]
    return model, copy.deepcopy(model), micro


@pytest.mark.parametrize("method", ["moby", "byol"])
def test_accumulated_step_is_the_mean_of_its_micro_batches(tiny_overrides, method):
    """``train_step`` over 2 micro-batches against a hand-written reference (synco/engine/step.py's contract): each
    micro-batch has its own forward (its own BatchNorm statistics) and loss, meets the queue with the previous
    micro-batch's keys already enqueued, and the optimizer receives the *mean* of the micro-batch gradients; then the
    target takes its EMA step. Gradients agree to 1e-6 (the same operations: seen 0); a step that summed the micro-batch
    gradients (no division by their number) is 2x off, one that enqueued after the last micro-batch only meets
    another queue."""
    from synco.engine.step import train_step

    model, ref, micro = _accumulation_case(tiny_overrides, method)
    params = [p for p in ref.online.parameters() if p.requires_grad]
    opt = RecordingSGD([p for p in model.online.parameters() if p.requires_grad], lr=0.1)
    sums = train_step(model, model.online, opt, micro, use_synthetic=False, momentum=0.9, clip_grad=None, bf16=False)

    grads, losses = [], []
    for x1, x2 in micro:
        q1, q2 = ref.online(x1, x2)
        loss, _, (k1, k2) = ref.loss(q1, q2, x1, x2)
        grads.append(torch.autograd.grad(loss, params))
        ref.enqueue(k1, k2)  # before the next micro-batch's forward
        losses.append(loss.detach())
    mean = [(a + b) / 2 for a, b in zip(*grads)]
    assert len(opt.grads) == len(mean)
    for got, want in zip(opt.grads, mean):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert max(g.abs().max() for g in mean) > 1e-2  # real gradients, not two zeros agreeing
    torch.testing.assert_close(sums["loss"], losses[0] + losses[1])  # summed; the trainer averages when logging
    with torch.no_grad():
        for p, g in zip(params, mean):
            p.sub_(0.1 * g)
        ref.momentum_update(0.9)
    for (name, got), want in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)  # weights, EMA, BN statistics, queues


def test_byol_accumulating_k_copies_of_a_batch_is_one_batch_of_the_copies(tiny_overrides):
    """Where k x b must equal one batch of kb: BYOL (no queue) on k identical micro-batches. Their BatchNorm
    statistics are those of the batch of their k copies (mean and biased variance alike), so the loss and the
    gradient are too: the accumulated step hands the optimizer the gradient of the single batch (to 1e-4 of each
    tensor's gradient; seen 4e-6). With the micro-batch losses summed instead of averaged it would be k x that.
    (MoBY never: its second micro-batch meets the first one's keys in the queue, where one batch meets none.)"""
    from synco.engine.step import train_step

    one, acc, micro = _accumulation_case(tiny_overrides, "byol")
    x1, x2 = micro[0]
    opt_acc = RecordingSGD([p for p in acc.online.parameters() if p.requires_grad], lr=0.1)
    opt_one = RecordingSGD([p for p in one.online.parameters() if p.requires_grad], lr=0.1)
    k = 3
    step = dict(use_synthetic=False, momentum=0.9, clip_grad=None, bf16=False)
    sums_acc = train_step(acc, acc.online, opt_acc, [(x1, x2)] * k, **step)
    sums_one = train_step(one, one.online, opt_one, [(x1.repeat(k, 1, 1, 1), x2.repeat(k, 1, 1, 1))], **step)
    torch.testing.assert_close(sums_acc["loss"] / k, sums_one["loss"], rtol=0, atol=1e-6)
    # per tensor, |g_acc - g_one| / |g_one| (the zero-gradient biases, |g| ~ 1e-7, aside)
    gaps = [((a - b).norm() / b.norm()).item() for a, b in zip(opt_acc.grads, opt_one.grads) if b.norm() > 1e-3]
    assert len(gaps) >= len(opt_one.grads) - 4 and max(gaps) < 1e-4, gaps
    for name, p in one.online.named_parameters():
        torch.testing.assert_close(dict(acc.online.named_parameters())[name], p, rtol=0, atol=1e-6, msg=name)
