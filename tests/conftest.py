"""Shared fixtures: tiny offline image datasets and per-test seeding; the tiny CPU/fp32 training config; comparisons
of two trainings that name the few tensors float noise may steer (and fail on a tensor that did not train); a
`synco` process paused at a known step, for tests that signal or kill it on a handshake instead of a clock."""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _photos() -> dict[str, list[np.ndarray]]:
    """Real photos that ship with scikit-image / scikit-learn, two per class (no download)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {
        "indoor": [skimage.data.chelsea(), skimage.data.coffee()],
        "outdoor": [china, flower],
        "space": [skimage.data.astronaut(), skimage.data.rocket()],
    }


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """``root/{train,val}/{indoor,outdoor,space}/*.jpg``: 6 train and 3 val 48x48 RGB crops per class."""
    root = tmp_path_factory.mktemp("tiny_imagefolder")
    rng = np.random.default_rng(0)
    for cls, photos in _photos().items():
        # Shrink first so a 48 px crop shows a recognisable part of the photo, not a flat patch.
        small = []
        for p in photos:
            img = Image.fromarray(p)
            scale = 96 / min(img.size)
            small.append(np.asarray(img.resize((round(img.width * scale), round(img.height * scale)))))
        for split, n in (("train", 6), ("val", 3)):
            out = root / split / cls
            out.mkdir(parents=True)
            for i in range(n):
                p = small[i % len(small)]
                y = rng.integers(0, p.shape[0] - 48 + 1)
                x = rng.integers(0, p.shape[1] - 48 + 1)
                Image.fromarray(p[y:y + 48, x:x + 48]).save(out / f"{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """``root/{train,val}/<0..9>/*.png``: 32x32 digits, 20 train and 10 val (from the test split) per class."""
    from synco.data.digits import export_digits_imagefolder

    root = tmp_path_factory.mktemp("digits_folder")
    export_digits_imagefolder(root / "train", "train", image_size=32, per_class=20)
    export_digits_imagefolder(root / "val", "test", image_size=32, per_class=10)
    return root


# A pretraining config small enough for seconds-long CPU runs (digits subset, 1-block ViT). ``device=cpu`` and
# ``precision=fp32`` are pinned: with the defaults (auto) a machine with a visible GPU would run every "CPU" test on
# CUDA in bf16, so the fp32 references would be bf16 too. A test of another precision appends its own (the last
# override wins); CUDA runs are tests/test_cuda.py's.
CPU_FP32 = ["device=cpu", "precision=fp32"]
TINY_OVERRIDES = [
    *CPU_FP32, "epochs=2", "optim.warmup_epochs=0", "negatives.warmup_epochs=0", "negatives.cooldown_epochs=0",
    "optim.batch_size=32", "contrast.queue_size=128", "negatives.n_hard=16", "negatives.counts=[4,4,4,4,4,4]",
    "model.proj_hidden=64", "model.pred_hidden=64", "model.proj_dim=32",
    "model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "data.max_images=128", "knn_at_end=false", "log_every=1", "threads=1",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY_OVERRIDES)


def later_wins(overrides: list[str]) -> list[str]:
    """A flat key=value list in which a later key replaces an earlier one: how a test layers the tiny config, a
    file's shared keys and its own (synco itself refuses one key given twice with different values)."""
    from synco.options import layer_overrides

    return layer_overrides(*([o] for o in overrides))


@pytest.fixture
def one_thread():
    """One torch thread for tests that time or compare runs on this shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- comparing two trainings of the tiny model --------------------------------------------------------------------

# Online parameters whose true gradient is exactly zero. Each adds a constant in front of an operation that subtracts
# it again: the backbone's final-norm bias and the projector's first Linear bias come before the projector's BatchNorm
# (in training mode: the backbone's output is the projector's input), the projector's last bias and the predictor's
# first Linear bias before the predictor's BatchNorm; and the key third of every attention's qkv bias adds q.b to all
# of a query's logits, which the softmax cancels. test_gpu_paths.py::
# test_zero_gradient_parameters_are_exactly_the_shifts_that_cancel checks this list in float64.
ZERO_GRAD_PARAMS = ("backbone.norm.bias", "projector.0.bias", "projector.3.bias", "predictor.0.bias")
QKV_BIAS = re.compile(r"backbone\.blocks\.\d+\.attn\.qkv\.bias")
# Their float noise (sums that cancel to ~1e-9, not to 0) is what Adam steps on: it divides a gradient by its own
# running magnitude, so noise moves them by up to about lr per step, in directions that differ between two runs of the
# same maths. The running means of the BatchNorms right after them follow them, and the target's copies (EMA) follow
# the online ones.
SHIFTED_BY_ZERO_GRAD = ("projector.1.running_mean", "predictor.1.running_mean")


def zero_grad_mask(name: str, shape) -> Optional[torch.Tensor]:
    """The elements of online parameter ``name`` (``backbone.…``) whose true gradient is zero; None if none."""
    if name in ZERO_GRAD_PARAMS:
        return torch.ones(shape, dtype=torch.bool)
    if QKV_BIAS.fullmatch(name):
        mask = torch.zeros(shape, dtype=torch.bool)
        third = shape[0] // 3
        mask[third:2 * third] = True  # [q | k | v]
        return mask
    return None


def noise_mask(key: str, shape) -> Optional[torch.Tensor]:
    """The elements of model state ``key`` (``online.…``/``target.…``) that float noise steers (see above)."""
    encoder, _, rest = key.partition(".")
    if encoder not in ("online", "target"):
        return None
    if rest in SHIFTED_BY_ZERO_GRAD:
        return torch.ones(shape, dtype=torch.bool)
    return zero_grad_mask(rest, shape)


def initial_state(cfg) -> dict:
    """The model state every training of ``cfg`` starts from (the trainer seeds with ``cfg.seed`` right before
    building the model, on every rank)."""
    from synco.models.method import create_model

    torch.manual_seed(cfg.seed)
    return {k: v.clone() for k, v in create_model(cfg).state_dict().items()}


def logged_lrs(out_dir) -> list[float]:
    """The learning rate of every optimizer step of a run logged with ``log_every=1``."""
    import json
    from pathlib import Path

    records = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if "loss" in r]


def update_gap(got: torch.Tensor, ref: torch.Tensor, init: torch.Tensor) -> float:
    """How far two runs' updates of one tensor are apart, relative to the reference update:
    ``|(got - init) - (ref - init)| / |ref - init|`` (Frobenius norms). A tensor the compared run did not train
    scores 1, one it stepped the wrong way 2; infinite if the reference run did not train it."""
    step = (ref - init).double().norm()
    return ((got - ref).double().norm() / step).item() if step > 0 else math.inf


def _exact_or_queue(key: str, got: torch.Tensor, ref: torch.Tensor, queue_atol: float) -> bool:
    """Compare what needs no update analysis: integer buffers exactly, queues to ``queue_atol``. True if done."""
    if not ref.is_floating_point():
        assert torch.equal(got, ref), key
        return True
    if key.startswith("queue."):
        torch.testing.assert_close(got, ref, rtol=0, atol=queue_atol, msg=key)
        return True
    return False


def assert_same_training(got: dict, ref: dict, init: dict, *, atol: float, max_gap: float, noise_atol: float,
                         queue_atol: float) -> None:
    """Two trainings of the same maths from the same ``init`` ended at the same model state ``got`` and ``ref``.

    The elements of every float tensor that float noise does not steer (:func:`noise_mask`) agree to ``atol`` (no
    relative slack), and their update from ``init`` agrees with the reference update to ``max_gap`` of its size
    (:func:`update_gap`): so a tensor either run did not train fails, even one whose update is below ``atol``
    (the target's, a few % of the online one's). The noise-steered elements agree to ``noise_atol`` and moved in both
    runs. Queues agree to ``queue_atol``, integer buffers exactly."""
    assert got.keys() == ref.keys() == init.keys()
    for k, r in ref.items():
        g, i = got[k], init[k]
        if _exact_or_queue(k, g, r, queue_atol):
            continue
        noisy = noise_mask(k, r.shape)
        tight = torch.ones(r.shape, dtype=torch.bool) if noisy is None else ~noisy
        if tight.any():
            torch.testing.assert_close(g[tight], r[tight], rtol=0, atol=atol, msg=k)
            gap = update_gap(g[tight], r[tight], i[tight])
            assert gap <= max_gap, f"{k}: the updates of the two runs are {gap:.2e} of an update apart"
        if noisy is not None and noisy.any():
            torch.testing.assert_close(g[noisy], r[noisy], rtol=0, atol=noise_atol, msg=f"{k} (noise-steered)")
            for name, state in (("reference", r), ("compared", g)):
                assert not torch.equal(state[noisy], i[noisy]), f"{k} never changed in the {name} run"


def first_step_gradients(checkpoint: dict, cfg) -> dict[str, torch.Tensor]:
    """``{online parameter name: its gradient}`` of the first optimizer step, read from a checkpoint written right
    after it: AdamW's first moment is then ``(1 - beta1) * gradient`` (after clipping), whatever the optimizer's
    kernel. Only the parameters the optimizer steps have one."""
    from synco.engine.optim import create_optimizer
    from synco.models.method import create_model

    model = create_model(cfg)
    optimizer = create_optimizer(model, cfg.optim, 1.0, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = checkpoint["optimizer"]["state"]
    assert all(float(s["step"]) == 1 for s in state.values()), "not a checkpoint of the first step"
    return {order[int(i)]: s["exp_avg"] / (1 - cfg.optim.betas[0]) for i, s in state.items()}


def first_step(g: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """AdamW's first step of an element with gradient ``g``, in units of the learning rate (before weight decay):
    ``g / (|g| + eps)``, the sign of the gradient however small it is (the moments' bias corrections cancel)."""
    return g / (g.abs() + eps)


def assert_same_first_step(got: dict, ref: dict, cfg, *, grad_gap: float, atol: float = 1e-6,
                           buffer_atol: float = 1e-5, queue_atol: float = 1e-5) -> None:
    """Two runs of the same maths (``cfg``'s, up to the code path under test), stopped with a checkpoint right after
    their first optimizer step (``got`` and ``ref``), took the same step.

    * Gradients (:func:`first_step_gradients`): every online parameter that requires one has one in both runs, and
      its elements with a true gradient (:func:`zero_grad_mask`) agree to ``grad_gap`` of the reference gradient's
      norm (``|g - g_ref| <= grad_gap |g_ref|``, Frobenius).
    * Weights: the first step moves each element by ``lr`` times :func:`first_step` of its gradient, the gradient's
      sign however small it is. So where a gradient is within the two runs' disagreement of 0, the two steps may
      differ by up to two steps; such an element is named by its two gradients (their steps differ by more than
      ``atol / 2``), and must have a reference gradient no larger than the step's formula allows for that
      (``worst + sqrt(eps * worst / threshold)``, ``worst`` the largest gradient disagreement of its tensor). These
      elements, and those with a zero true gradient, may differ by two steps (``2 lr (1 + weight_decay |w|)``), in
      the online parameter and in its EMA in the target. Every other element agrees to ``atol``, and each tensor's
      update from the initial state agrees to 1e-3 of its size (:func:`update_gap`), so a tensor either run did not
      train fails, even one whose update is below ``atol`` (the target's, a few % of the online one's).
    * Buffers (BatchNorm statistics, from the step's forward on the initial weights) agree to ``buffer_atol`` and
      moved; queues agree to ``queue_atol``; integer buffers exactly.
    """
    init = initial_state(cfg)
    fresh = _fresh_model(cfg)
    trained = {f"online.{n}" for n, p in fresh.online.named_parameters() if p.requires_grad}
    g_got, g_ref = first_step_gradients(got, cfg), first_step_gradients(ref, cfg)
    assert set(g_got) == set(g_ref) == trained, (set(g_ref) ^ trained, set(g_got) ^ trained)
    lr, wd, eps = ref["optimizer"]["param_groups"][0]["lr"], cfg.optim.weight_decay, 1e-8
    assert got["optimizer"]["param_groups"][0]["lr"] == lr and ref["optimizer"]["param_groups"][0]["eps"] == eps
    threshold = atol / (2 * lr)  # a step difference (in lr) that ``atol`` would see
    free: dict[str, torch.Tensor] = {}  # online name -> the elements allowed two steps apart
    for name, gr in g_ref.items():
        gg = g_got[name]
        zero = zero_grad_mask(name[len("online."):], gr.shape)
        zero = torch.zeros(gr.shape, dtype=torch.bool) if zero is None else zero
        real = ~zero
        free[name] = zero
        if not real.any():
            continue
        assert gr[real].norm() > 0, f"{name} has no gradient in the reference run"
        gap = update_gap(gg[real], gr[real], torch.zeros_like(gr[real]))
        assert gap <= grad_gap, f"{name}: the gradients are {gap:.2e} of the reference gradient apart"
        decided = real & ((first_step(gg, eps) - first_step(gr, eps)).abs() > threshold)
        worst = (gg - gr)[real].abs().max().item()
        near_zero = worst + math.sqrt(eps * worst / threshold)
        assert (gr[decided].abs() <= near_zero).all(), f"{name}: a step differs where the gradient is not noise"
        free[name] = zero | decided
    params = dict(fresh.named_parameters())
    for k, r in ref["model"].items():
        g, i = got["model"][k], init[k]
        if _exact_or_queue(k, g, r, queue_atol):
            continue
        if k not in params:  # a buffer: BatchNorm running statistics
            torch.testing.assert_close(g, r, rtol=0, atol=buffer_atol, msg=k)
            assert not torch.equal(r, i) and not torch.equal(g, i), f"{k} never changed"
            continue
        exempt = free["online." + k.split(".", 1)[1]]
        if not exempt.all():
            torch.testing.assert_close(g[~exempt], r[~exempt], rtol=0, atol=atol, msg=k)
            gap = update_gap(g[~exempt], r[~exempt], i[~exempt])
            assert gap <= 1e-3, f"{k}: the updates of the two runs are {gap:.2e} of an update apart"
        else:  # a zero-gradient tensor: float noise steps it, in both runs
            assert not torch.equal(r, i) and not torch.equal(g, i), f"{k} never changed"
        two_steps = 2 * lr * (1 + wd * i[exempt].abs())
        assert ((g[exempt] - r[exempt]).abs() <= two_steps).all(), f"{k}: more than two steps apart"


def _fresh_model(cfg):
    from synco.models.method import create_model

    torch.manual_seed(cfg.seed)
    return create_model(cfg)


# --- a `synco pretrain` process paused at a known step ----------------------------------------------------------

# Runs ``synco`` (argv as for ``python -m synco``) with the trainer's step function wrapped: at optimizer step
# SYNCO_TEST_PAUSE_STEP it writes its PID to SYNCO_TEST_READY, then waits (``kill``: forever, for the test to kill it;
# ``signal``: until a SIGINT/SIGTERM has been recorded) before taking the step. So a test acts at a known step,
# on a handshake, instead of sleeping and hoping the run is where it should be.
_PAUSED_PRETRAIN = """
import os, sys, threading, time
from pathlib import Path

import synco.engine.train as train
from synco.engine import signals

step, ready, until = int(os.environ["SYNCO_TEST_PAUSE_STEP"]), Path(os.environ["SYNCO_TEST_READY"]), \\
    os.environ["SYNCO_TEST_UNTIL"]
original, calls = train.train_step, [0]


def train_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == step:
        ready.write_text(str(os.getpid()))
        if until == "kill":
            threading.Event().wait()
        while signals._S.pending is None:  # the handler records the signal (it arrives in this loop)
            time.sleep(0.01)
    return original(*args, **kwargs)


train.train_step = train_step
from synco.cli.main import main

sys.exit(main())
"""


def paused_synco(argv: list, *, step: int, until: str, ready, **popen) -> subprocess.Popen:
    """Start ``python -m synco *argv`` that pauses before optimizer step ``step`` (see above); ``ready`` is the
    handshake file it writes there."""
    env = {**os.environ, "SYNCO_TEST_PAUSE_STEP": str(step), "SYNCO_TEST_READY": str(ready),
           "SYNCO_TEST_UNTIL": until}
    return subprocess.Popen([sys.executable, "-c", _PAUSED_PRETRAIN, *argv], env=env, **popen)


def wait_for(condition, what: str, proc=None, timeout: float = 300.0) -> None:
    """Wait until ``condition()`` holds: a handshake, not a race (the timeout only turns a hang into a failure).
    Fails at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.02)
