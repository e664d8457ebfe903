"""Every code path written for GPUs, run on CPU: this project's machines have no GPU, so nothing else runs them.

Each path is checked against fp32 / eager / one process, with the tolerance stated next to it:

* ``precision=bf16`` through CPU autocast (on CUDA the same autocast region runs the matmuls in bf16);
* fused AdamW (torch has a fused kernel for CPU as for CUDA; ``build_optimizer`` uses it on both);
* ``compile=true`` (inductor: C++ kernels here, Triton on CUDA; the same dynamo / AOTAutograd capture);
* DDP under gloo combined with each of them (NCCL on GPUs; the same DDP and sync-BN code).

The model is the tiny test config; runs are 2 optimizer steps (64 images, batch 32) without DataLoader workers.
Without the two compile tests the file takes ~6 s on 2 busy cores. Those are marked slow: inductor builds its
C++ kernels with g++ (46 s and 79 s with an empty inductor cache, ~10 s and ~20 s with a warm one).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from synco.config import load_config
from synco.engine.optim import build_optimizer, fused_adamw_supported
from synco.engine.train import Trainer
from synco.io import load_torch_file as load
from synco.models.method import create_model

# 2 steps of batch 32 in one epoch, no worker process. Drop path off: a compiled graph draws its random
# numbers with inductor's own generator, so eager and compiled runs would drop different samples.
SHORT = ["epochs=1", "data.max_images=64", "data.num_workers=0", "model.drop_path_online=0.0"]

# One process x batch 2b == two processes x batch b (as in test_distributed.py): MoBY, because synthetic
# negatives draw from per-rank streams by design.
EQUIV = ["method=moby", "contrast.queue_size=64"]


def losses(out_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (out_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def train(tmp_path, name, overrides) -> list[float]:
    cfg = load_config("cpu-demo", overrides)
    Trainer(cfg, tmp_path / name, progress=False).train()
    return losses(tmp_path / name)


@pytest.fixture(scope="module")
def fp32_eager(tmp_path_factory):
    """The reference: fp32, eager, one process, SynCo with synthetic negatives from the first step."""
    from conftest import TINY_OVERRIDES

    tmp = tmp_path_factory.mktemp("fp32")
    base = TINY_OVERRIDES + SHORT
    return base, train(tmp, "run", base), tmp / "run"


# --- bf16 autocast ---------------------------------------------------------------------------------------


def test_bf16_autocast_loss_is_close_to_fp32(tmp_path, fp32_eager):
    base, ref, _ = fp32_eager
    got = train(tmp_path, "bf16", base + ["precision=bf16"])
    assert len(got) == len(ref) == 2
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per op); seen 1.7e-3 relative.
    assert got == pytest.approx(ref, rel=1e-2)
    assert got != ref  # autocast really ran in bf16: not the fp32 numbers


def test_bf16_autocast_runs_matmuls_in_bf16(tiny_overrides):
    cfg = load_config("cpu-demo", tiny_overrides)
    torch.manual_seed(0)
    model = create_model(cfg).train()
    x = torch.randn(8, 3, 16, 16)
    seen = []
    hook = model.online.projector.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(x, x.flip(-1), use_synthetic=True)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16} and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.online.parameters() if p.grad is not None)


# --- fused AdamW ---------------------------------------------------------------------------------------


def test_fused_adamw_equals_foreach(tiny_overrides):
    assert fused_adamw_supported(torch.device("cpu")) and fused_adamw_supported(torch.device("cuda"))
    assert not fused_adamw_supported(torch.device("meta"))
    cfg = load_config("cpu-demo", tiny_overrides)
    torch.manual_seed(0)
    model = create_model(cfg).train()
    twin = create_model(cfg).train()
    twin.load_state_dict(model.state_dict())
    start = {k: v.detach().clone() for k, v in model.online.named_parameters()}
    fused = build_optimizer(model, cfg.optim, 1e-2, torch.device("cpu"))
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    foreach = build_optimizer(twin, cfg.optim, 1e-2, torch.device("meta"))  # no fused kernel there
    assert foreach.defaults["foreach"] and not foreach.defaults["fused"]
    groups = [(g["weight_decay"], len(g["params"])) for g in fused.param_groups]
    assert groups == [(g["weight_decay"], len(g["params"])) for g in foreach.param_groups]
    assert {wd for wd, _ in groups} == {0.0, cfg.optim.weight_decay}  # decay and no-decay groups both stepped
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # three steps: the moment estimates and bias corrections take part too
        x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
        loss, _, _ = model(x1, x2, use_synthetic=False)
        loss.backward()
        # the same gradients for both, so only the optimizer's arithmetic differs (no feedback through the model)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        fused.step()
        foreach.step()
        fused.zero_grad(set_to_none=True)
        foreach.zero_grad(set_to_none=True)
    a, b = dict(model.online.named_parameters()), dict(twin.online.named_parameters())
    for name, p in a.items():
        # The same update with float operations in another order: seen 1.5e-8 apart at most (steps are ~1e-2).
        torch.testing.assert_close(p, b[name], rtol=0, atol=1e-6, msg=name)
    assert all((a[k] - start[k]).abs().max() > 1e-3 for k in a)  # every parameter took real steps
    state_a, state_b = fused.state_dict()["state"], foreach.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for i in state_a:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state_a[i][key], state_b[i][key], rtol=1e-6, atol=0)


# --- DDP (gloo) combined with each -------------------------------------------------------------------


def run_plan(plan: list) -> None:
    """Train each (output dir, overrides) of ``plan`` in this process, one of a gloo group the environment
    describes; a case that raises leaves its traceback in ``error.txt`` and ends the plan."""
    import traceback
    from pathlib import Path

    for out, overrides in plan:
        try:
            Trainer(load_config("cpu-demo", overrides), out, progress=False).train()
        except BaseException:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "error.txt").write_text(traceback.format_exc())
            raise


def _rank(env: dict, plan: list) -> None:
    os.environ.update(env)
    try:
        run_plan(plan)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# case: (extra overrides, relative tolerance of the losses of 2 processes x batch 16 against 1 process x batch 32)
DDP_CASES = {
    # fp32 eager, fused AdamW (the CPU default): the same sums in another order (sync-BN statistics, gradient
    # all-reduce); seen 2.2e-7.
    "fused": ([], 1e-5),
    # bf16 rounds activations to 8 mantissa bits, so a 1-ulp fp32 difference of order can flip a bf16 rounding
    # (2^-9 = 2e-3 relative); seen 3.3e-4.
    "bf16": (["precision=bf16"], 5e-3),
    # compiled kernels in both runs; DDP's compiled graph is split at gradient buckets; seen 0 (bit-equal).
    "compile": (["compile=true"], 1e-5),
}


def ddp_case(case: str) -> list[str]:
    from conftest import TINY_OVERRIDES

    return TINY_OVERRIDES + SHORT + EQUIV + DDP_CASES[case][0]


def launch(tmp_path, cases, start: str = "fork") -> dict:
    """Train each case with 2 processes x batch 16 under gloo; {case: output dir}.

    The processes get torchrun's environment variables and run the trainer's code, as under torchrun. ``fork``
    starts them from this process, with torch, timm and the data modules imported, where two fresh interpreters
    (``spawn``) take 15-30 s to start on 2 busy cores (the training takes ~2 s). Compiling needs ``spawn``: a
    child forked after this process has compiled (with inductor's worker pool) was seen to die mid-compile."""
    import multiprocessing

    outs = {case: tmp_path / case for case in cases}
    plan = [(str(outs[c]), ddp_case(c) + ["optim.batch_size=16"]) for c in cases]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    envs = [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
             "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"} for rank in range(2)]
    procs = [multiprocessing.get_context(start).Process(target=_rank, args=(env, plan)) for env in envs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=900)
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    for out in outs.values():
        out.mkdir(parents=True, exist_ok=True)
        (out / "launch.log").write_text(f"exit codes of ranks 0 and 1: {codes}")
    return outs


def check_ddp(tmp_path, case: str, two_dir) -> None:
    error, log = two_dir / "error.txt", two_dir / "launch.log"
    assert not error.exists(), error.read_text()
    assert (two_dir / "checkpoint.pt").exists(), log.read_text() if log.exists() else "no output"
    one = train(tmp_path, f"one-{case}", ddp_case(case) + ["optim.batch_size=32"])
    two = losses(two_dir)
    assert len(one) == len(two) == 2
    assert two == pytest.approx(one, rel=DDP_CASES[case][1])
    state = load(two_dir / "checkpoint.pt")
    assert state["world_size"] == 2 and state["global_batch"] == 32
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])  # fused AdamW in every case on CPU


@pytest.fixture(scope="module")
def ddp_eager(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp"), ["fused", "bf16"])


@pytest.mark.dist
def test_ddp_with_fused_adamw_equals_one_process(tmp_path, ddp_eager):
    check_ddp(tmp_path, "fused", ddp_eager["fused"])


@pytest.mark.dist
def test_ddp_with_bf16_autocast_equals_one_process(tmp_path, ddp_eager):
    check_ddp(tmp_path, "bf16", ddp_eager["bf16"])


# --- torch.compile --------------------------------------------------------------------------------------


@pytest.mark.slow  # inductor compiles ~17 C++ kernels with g++: 30-150 s cold on 2 busy cores, ~10 s when cached
def test_compile_matches_eager(tmp_path, fp32_eager):
    base, ref, ref_dir = fp32_eager
    got = train(tmp_path, "compiled", base + ["compile=true"])
    assert len(got) == len(ref) == 2
    # Same maths, other kernels (fused elementwise ops, other summation orders): seen 4e-6 apart.
    assert got == pytest.approx(ref, abs=1e-4, rel=0)
    a, b = load(ref_dir / "checkpoint.pt")["model"], load(tmp_path / "compiled" / "checkpoint.pt")["model"]
    for k, v in a.items():
        if v.is_floating_point() and not k.startswith("queue"):
            # Matrices: seen 8e-7 apart. Biases that feed a BatchNorm have an exactly zero true gradient, and Adam
            # turns the float noise of theirs into steps of up to ~lr (6e-4) each (see test_distributed.py); they
            # and the running means that follow them: seen 1.3e-3 apart after 2 steps.
            loose = v.dim() < 2 or "running" in k
            torch.testing.assert_close(b[k], v, rtol=0, atol=5e-3 if loose else 1e-5, msg=k)


@pytest.mark.dist
@pytest.mark.slow  # two fresh processes compile their graphs (sync BN, gradient buckets) at once: 1-2 min
def test_ddp_with_compile_equals_one_process(tmp_path):
    check_ddp(tmp_path, "compile", launch(tmp_path, ["compile"], start="spawn")["compile"])
