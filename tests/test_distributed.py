"""torchrun on CPU (gloo): 2 processes x batch b must be the same run as 1 process x batch 2b."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import assert_same_training, initial_state, logged_lrs

from synco.config import load_config
from synco.engine.train import Trainer, stop_at_step
from synco.io import load_torch_file as load
from synco.options import layer_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# MoBY without drop path: every random draw is then keyed by the data (augmentations are seeded by
# sample index), so 1 and 2 processes see identical inputs. Synthetic negatives and drop path draw from
# per-rank streams by design, so they are off here.
# The tolerances below were set at m 0.99 and base lr 5e-3: pinned here, so retuning cpu-demo (m 0.9, lr 1e-2,
# which carry the online weights' float noise into the target and its keys ten times faster) leaves them valid.
EQUIV = ["method=moby", "model.drop_path_online=0.0", "epochs=2", "contrast.queue_size=64",
         "contrast.momentum_start=0.99", "optim.base_lr=5e-3"]


def run(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "synco", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "synco", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_weights(got, ref, init, ref_dir):
    """The weights after training (conftest.assert_same_training): every element to 1e-5 (seen 4e-7) and every
    tensor's update to 1e-3 of its size (seen 7e-5), so a tensor that did not train in either run fails. Exempt: the
    elements with a zero true gradient (conftest.zero_grad_mask), which Adam steps on float noise by up to
    (1 - beta1) / sqrt(1 - beta2) = 3.2 lr per step in either direction, and the BatchNorm running means they
    shift: each pair within twice that bound summed over the run's steps (seen 0.94 of the summed lr). The queues
    hold the keys of the same images in the same slots (all-gathered in rank order): seen 1.5e-5 apart, the keys of
    targets whose zero-gradient biases differ by float noise. These tolerances hold at m 0.99 and base lr 5e-3
    (EQUIV); a run whose first step lets float noise decide an element's sign (a gradient within noise of 0)
    departs further, which the one-step comparisons of test_gpu_paths.py name exactly."""
    bound = 2 * (1 - 0.9) / math.sqrt(1 - 0.999) * sum(logged_lrs(ref_dir))
    assert_same_training(got, ref, init, atol=1e-5, max_gap=1e-3, noise_atol=bound, queue_atol=5e-5)


def steps(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_two_processes_equal_one_process_with_double_batch(tmp_path, tiny_overrides):
    base = layer_overrides(tiny_overrides, EQUIV)
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run(["pretrain", "--no-progress", "--out", str(one), *layer_overrides(base, ["optim.batch_size=32"])])
    run(["pretrain", "--no-progress", "--out", str(two), *layer_overrides(base, ["optim.batch_size=16"])], nproc=2)
    a, b = load(one / "checkpoint.pt"), load(two / "checkpoint.pt")
    assert (a["step"], a["epoch"], a["global_batch"]) == (b["step"], b["epoch"], b["global_batch"]) == (8, 2, 32)
    assert b["world_size"] == 2
    init = initial_state(load_config("cpu-demo", base))
    assert_same_weights(b["model"], a["model"], init, one)
    la, lb = steps(one), steps(two)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 9))
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-5)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)  # scaled by the global batch, same schedule
        assert ra["momentum"] == pytest.approx(rb["momentum"], rel=1e-12)

    # resume a 1-process checkpoint with 2 processes (same global batch): same end point
    cfg = load_config("cpu-demo", layer_overrides(base, ["optim.batch_size=32"]))
    Trainer(cfg, resumed, progress=False, step_hooks=(stop_at_step(4),)).train()
    run(["pretrain", "--no-progress", "--out", str(resumed), *layer_overrides(base, ["optim.batch_size=16"])], nproc=2)
    c = load(resumed / "checkpoint.pt")
    assert_same_weights(c["model"], a["model"], init, one)

    # k-NN with features sharded over 2 processes equals the single-process result
    knn = ["eval", "knn", "--no-progress", "--checkpoint", str(one), "num_workers=0", "batch_size=100", "device=cpu",
           "k=[5,20]"]
    run(knn + ["--out", str(tmp_path / "knn1")])
    run(knn + ["--out", str(tmp_path / "knn2")], nproc=2)
    r1 = json.loads((tmp_path / "knn1" / "knn.json").read_text())
    r2 = json.loads((tmp_path / "knn2" / "knn.json").read_text())
    assert r1["n_test"] == r2["n_test"] == 360 and r1["n_train"] == r2["n_train"] == 1437
    for k in ("5", "20"):
        assert r1["results"][k]["top1"] == pytest.approx(r2["results"][k]["top1"], abs=1e-9)
        assert r1["results"][k]["top5"] == pytest.approx(r2["results"][k]["top5"], abs=1e-9)


def test_device_augmentation_two_processes_equal_one(tmp_path, tiny_overrides):
    """Views made on the device from (seed, epoch, index) streams: 2 x b is the run 1 x 2b is."""
    base = layer_overrides(tiny_overrides, EQUIV, ["data.augment.on=device", "epochs=1"])
    one, two = tmp_path / "one", tmp_path / "two"
    run(["pretrain", "--no-progress", "--out", str(one), *layer_overrides(base, ["optim.batch_size=32"])])
    run(["pretrain", "--no-progress", "--out", str(two), *layer_overrides(base, ["optim.batch_size=16"])], nproc=2)
    a, b = load(one / "checkpoint.pt"), load(two / "checkpoint.pt")
    assert_same_weights(b["model"], a["model"], initial_state(load_config("cpu-demo", base)), one)
    for ra, rb in zip(steps(one), steps(two)):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-5)

