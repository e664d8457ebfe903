"""Every code path written for GPUs, run on CPU: this project's machines have no GPU, so nothing else runs them.

Each path is checked against fp32 / eager / one process, with the tolerances stated next to them, on the loss and
on the whole state after the first optimizer step (``conftest.assert_same_first_step``: the step's gradients, every
weight, BatchNorm statistics and queues; only the elements whose gradient is zero or within float noise of it are
exempt, and every trained tensor must have moved):

* ``precision=bf16`` through CPU autocast (on CUDA the same autocast region runs the matmuls in bf16);
* fused AdamW (torch has a fused kernel for CPU as for CUDA; ``create_optimizer`` uses it on both);
* ``compile=true`` (inductor: C++ kernels here, Triton on CUDA; the same dynamo / AOTAutograd capture);
* DDP under gloo combined with each of them (NCCL on GPUs; the same DDP and sync-BN code), with gradient
  accumulation (``no_sync``), and SynCo itself on 2 processes (per-rank synthetic streams, one shared queue).

Why one step: AdamW's first step moves each element by ``lr`` times the sign of its gradient, however small, so an
element whose gradient is within float noise of 0 steps either way in two runs of the same maths, and every later
step sees that difference: after a second step the two runs of DDP with accumulation were seen 3 % of an update
apart in whole matrices. One step is compared exactly, with the noise-decided elements named.

Every run pins ``device=cpu`` (conftest.TINY_OVERRIDES): with a GPU visible these still test the CPU path; the CUDA
runs are tests/test_cuda.py's. The model is the tiny test config; the runs stop after the first of 2 optimizer
steps (64 images, batch 32) without DataLoader workers. Without the two compile tests the file takes ~7 s on 2 busy
cores. Those are marked slow: inductor builds its C++ kernels with g++ (46 s and 79 s with an empty inductor cache,
~5 s and ~16 s with a warm one).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, assert_same_first_step, initial_state, later_wins, zero_grad_mask

from synco.config import load_config
from synco.engine.optim import create_optimizer, fused_adamw_supported
from synco.engine.train import Trainer, stop_at_step
from synco.io import load_torch_file as load
from synco.models.method import create_model

# 2 steps of batch 32 in one epoch (the runs stop after the first), no worker process. Drop path off: a compiled
# graph draws its random numbers with inductor's own generator, so eager and compiled runs would drop different
# samples.
SHORT = ["epochs=1", "data.max_images=64", "data.num_workers=0", "model.drop_path_online=0.0"]

# One process x batch 2b == two processes x batch b (as in test_distributed.py): MoBY, because synthetic
# negatives draw from per-rank streams by design.
EQUIV = ["method=moby", "contrast.queue_size=64"]


def tiny_config(overrides: list[str]):
    """The cpu-demo config with ``overrides``, layered (a later key replaces an earlier one: conftest.later_wins)."""
    return load_config("cpu-demo", later_wins(overrides))


def losses(out_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (out_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def train(tmp_path, name, overrides, steps: int | None = 1) -> Path:
    """Train ``overrides`` into ``tmp_path / name``, stopping with a checkpoint after ``steps`` optimizer steps
    (None: to the end)."""
    cfg = tiny_config(overrides)
    hooks = (stop_at_step(steps),) if steps else ()
    Trainer(cfg, tmp_path / name, progress=False, step_hooks=hooks).train()
    return tmp_path / name


@pytest.fixture(scope="module")
def fp32_eager(tmp_path_factory):
    """The reference: fp32, eager, one process, SynCo with synthetic negatives from the first step."""
    tmp = tmp_path_factory.mktemp("fp32")
    base = TINY_OVERRIDES + SHORT
    out = train(tmp, "run", base)
    return base, losses(out), out


def test_zero_gradient_parameters_are_exactly_the_shifts_that_cancel(tiny_overrides):
    """The one exemption of the state comparisons (conftest.zero_grad_mask), computed: in float64 (queues aside)
    exactly these elements of the online parameters have a zero gradient (< 1e-13: rounding; seen 1.4e-15), and every
    other element a gradient far from it (> 1e-10; the smallest seen, of 28,000 and 40,000, is 1.4e-7), with a queue
    and without, at depths 1 and 2."""
    deeper = "model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"
    for extra in (["method=synco"], ["method=byol", deeper]):
        cfg = tiny_config(tiny_overrides + SHORT + extra)
        torch.manual_seed(0)
        model = create_model(cfg).double().train()
        if model.queue is not None:
            model.queue.float()  # the loss meets the queue in float32; the encoders' gradients stay float64
        g = torch.Generator().manual_seed(1)
        x1, x2 = (torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
        loss, _, _ = model(x1, x2, use_synthetic=True)
        loss.backward()
        zero, real = [], []
        for name, p in model.online.named_parameters():
            expect = zero_grad_mask(name, p.shape)
            expect = torch.zeros(p.shape, dtype=torch.bool) if expect is None else expect
            zero.append(p.grad[expect].abs())
            real.append(p.grad[~expect].abs())
        zero, real = torch.cat(zero), torch.cat(real)
        assert zero.numel() > 0 and zero.max() < 1e-13, (extra, zero.max())
        assert real.min() > 1e-10, (extra, real.min())


# bf16 against fp32, the first step's gradients, |g_bf16 - g_fp32| / |g_fp32| per tensor: bf16 rounds every
# activation to 2^-9, and the gradients of this loss are sums that largely cancel (a query's pull to its key against
# the push of its negatives), so the rounding survives at tens of % in some tensors: seen at most 0.32 (a ViT bias),
# 0.21 over all parameters at once, with SynCo as with MoBY. A gradient of the wrong sign scores 2, a doubled one 1.
BF16_GRAD_GAP = 0.5


# --- bf16 autocast ---------------------------------------------------------------------------------------


def test_bf16_autocast_is_close_to_fp32(tmp_path, fp32_eager):
    base, ref, ref_dir = fp32_eager
    out = train(tmp_path, "bf16", base + ["precision=bf16"])
    got = losses(out)
    assert len(got) == len(ref) == 1
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per op); seen 6e-4 relative.
    assert got == pytest.approx(ref, rel=1e-2)
    assert got != ref  # autocast really ran in bf16: not the fp32 numbers
    # Gradients: BF16_GRAD_GAP. Weights: the elements whose step the gradients decide agree to 1e-6 (seen 5e-7;
    # ~1,700 of ~50,000 trained elements have a gradient within bf16's error of 0 and may step either way).
    # BatchNorm statistics and keys come from bf16 activations: seen 8e-4 and 2e-2 apart.
    assert_same_first_step(load(out / "checkpoint.pt"), load(ref_dir / "checkpoint.pt"), tiny_config(base),
                           grad_gap=BF16_GRAD_GAP, buffer_atol=1e-2, queue_atol=5e-2)


def test_bf16_autocast_runs_matmuls_in_bf16(tiny_overrides):
    cfg = tiny_config(tiny_overrides)
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
    cfg = tiny_config(tiny_overrides)
    torch.manual_seed(0)
    model = create_model(cfg).train()
    twin = create_model(cfg).train()
    twin.load_state_dict(model.state_dict())
    start = {k: v.detach().clone() for k, v in model.online.named_parameters()}
    fused = create_optimizer(model, cfg.optim, 1e-2, torch.device("cpu"))
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    foreach = create_optimizer(twin, cfg.optim, 1e-2, torch.device("meta"))  # no fused kernel there
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


def start_method() -> str:
    """``fork`` starts the ranks from this process, with torch, timm and the data modules imported, where two fresh
    interpreters (``spawn``) take 15-30 s to start on 2 busy cores (the training takes ~2 s). But a child forked
    after CUDA was initialised inherits a CUDA context it cannot use (CUDA does not support fork: its first CUDA
    call fails or hangs), and on a machine with a GPU an earlier test of the session may have initialised it;
    then the ranks start fresh with ``spawn``."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


def launch_ranks(target, args: tuple, start: str | None = None, world: int = 2) -> list:
    """Run ``target(rank_env, *args)`` in ``world`` processes that form a gloo group as torchrun's would; returns
    their exit codes.

    The rendezvous store is this process's: it binds a port the system chooses (port 0) and holds it until the ranks
    are done, and the ranks connect to it as clients (``TORCHELASTIC_USE_AGENT_STORE``, as under torchrun's agent).
    No port is picked, released and hoped still free when a rank binds it. The port reaches the ranks through a
    pipe, once they are started: the store's server thread is never forked."""
    import multiprocessing
    from datetime import timedelta

    ctx = multiprocessing.get_context(start or start_method())
    procs, pipes = [], []
    for rank in range(world):
        env = {"MASTER_ADDR": "127.0.0.1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "TORCHELASTIC_USE_AGENT_STORE": "True"}
        ours, theirs = ctx.Pipe()
        procs.append(ctx.Process(target=_with_port, args=(theirs, target, env, *args)))
        pipes.append(ours)
    for proc in procs:
        proc.start()
    store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=300))
    for pipe in pipes:
        pipe.send(store.port)
    for proc in procs:
        proc.join(timeout=900)
        if proc.is_alive():
            proc.kill()
            proc.join()
    del store
    return [proc.exitcode for proc in procs]


def _with_port(pipe, target, env: dict, *args) -> None:
    env = {**env, "MASTER_PORT": str(pipe.recv())}
    os.environ.update(env)
    try:
        target(env, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_plan(plan: list) -> None:
    """Train each (output dir, overrides) of ``plan`` in this process, one of a gloo group the environment
    describes, stopping with a checkpoint after the first optimizer step; a case that raises leaves its traceback
    in ``error.txt`` and ends the plan."""
    import traceback

    for out, overrides in plan:
        try:
            Trainer(tiny_config(overrides), out, progress=False, step_hooks=(stop_at_step(1),)).train()
        except BaseException:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "error.txt").write_text(traceback.format_exc())
            raise


def _rank(env: dict, plan: list) -> None:
    run_plan(plan)


# case: (extra overrides, relative tolerance of the loss of 2 processes x batch 16 against 1 process x batch 32,
#        of their first step's gradients (conftest.assert_same_first_step), of their BatchNorm statistics and keys)
DDP_CASES = {
    # fp32 eager, fused AdamW (the CPU default): the same sums in another order (sync-BN statistics, gradient
    # all-reduce); seen: loss 1.2e-7, gradients 7e-6, statistics and keys 8e-7.
    "fused": ([], 1e-5, 1e-4, 1e-5),
    # bf16 rounds activations to 8 mantissa bits, so a 1-ulp fp32 difference of order can flip a bf16 rounding
    # (2^-9 = 2e-3 relative); seen: loss 0, gradients 0.016, statistics 1.2e-7 and keys 0 (the keys were 0.03 apart
    # while the loss ran in bf16).
    "bf16": (["precision=bf16"], 5e-3, 0.1, 5e-2),
    # 2 micro-batches per step (the first under DDP's no_sync, gradients all-reduced with the second's), 128
    # images: the sums of the fused case; seen: loss 0, gradients 1e-5, statistics and keys 8e-7.
    "accum": (["optim.accum_steps=2", "data.max_images=128"], 1e-5, 1e-4, 1e-5),
    # compiled kernels in both runs; DDP's compiled graph is split at gradient buckets; seen: loss 0 (bit-equal),
    # gradients 1e-5, statistics and keys 1.2e-6.
    "compile": (["compile=true"], 1e-5, 1e-4, 1e-5),
}


def ddp_case(case: str) -> list[str]:
    return TINY_OVERRIDES + SHORT + EQUIV + DDP_CASES[case][0]


def launch(tmp_path, cases, start: str | None = None) -> dict:
    """Train each case with 2 processes x batch 16 under gloo; {case: output dir}. ``start``: the start method
    (default :func:`start_method`). Compiling needs ``spawn``: a child forked after this process has compiled
    (with inductor's worker pool) was seen to die mid-compile."""
    outs = {case: tmp_path / case for case in cases}
    plan = [(str(outs[c]), ddp_case(c) + ["optim.batch_size=16"]) for c in cases]
    codes = launch_ranks(_rank, (plan,), start)
    for out in outs.values():
        out.mkdir(parents=True, exist_ok=True)
        (out / "launch.log").write_text(f"exit codes of ranks 0 and 1: {codes}")
    return outs


def check_ddp(tmp_path, case: str, two_dir) -> None:
    """2 processes x batch 16 against 1 process x batch 32, after the first optimizer step: the loss, the
    checkpoint's bookkeeping, and the whole state (gradients, weights, BatchNorm statistics and queues: the same keys
    in the same slots, all-gathered in rank order) with the case's tolerances."""
    error, log = two_dir / "error.txt", two_dir / "launch.log"
    assert not error.exists(), error.read_text()
    assert (two_dir / "checkpoint.pt").exists(), log.read_text() if log.exists() else "no output"
    one_dir = train(tmp_path, f"one-{case}", ddp_case(case) + ["optim.batch_size=32"])
    one, two = losses(one_dir), losses(two_dir)
    _, loss_rtol, grad_gap, stats_atol = DDP_CASES[case]
    assert len(one) == len(two) == 1
    assert two == pytest.approx(one, rel=loss_rtol)
    state = load(two_dir / "checkpoint.pt")
    assert state["world_size"] == 2 and state["global_batch"] == 32 and state["step"] == 1
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])  # fused AdamW in every case on CPU
    assert_same_first_step(state, load(one_dir / "checkpoint.pt"), tiny_config(ddp_case(case)),
                           grad_gap=grad_gap, buffer_atol=stats_atol, queue_atol=stats_atol)


@pytest.fixture(scope="module")
def ddp_eager(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp"), ["fused", "bf16", "accum"])


@pytest.mark.dist
def test_ddp_with_fused_adamw_equals_one_process(tmp_path, ddp_eager):
    check_ddp(tmp_path, "fused", ddp_eager["fused"])


@pytest.mark.dist
def test_ddp_with_bf16_autocast_equals_one_process(tmp_path, ddp_eager):
    check_ddp(tmp_path, "bf16", ddp_eager["bf16"])


@pytest.mark.dist
def test_ddp_with_gradient_accumulation_equals_one_process(tmp_path, ddp_eager):
    check_ddp(tmp_path, "accum", ddp_eager["accum"])


# --- SynCo on 2 processes -------------------------------------------------------------------------------


def _synco_rank(env: dict, out: str, overrides: list) -> None:
    """Train SynCo as one rank, recording the global RNG state before every synthetic-negative draw (their stream:
    the trainer passes no generator), and dump this rank's queues, its records and its draws' states."""
    import hashlib
    import traceback

    from synco.engine import train as train_module

    try:
        cfg = tiny_config(overrides)
        trainer = Trainer(cfg, out, progress=False)
        draws, original = [], trainer.model.negatives.__call__

        class Recording(type(trainer.model.negatives)):
            def __call__(self, q, queue, generator=None, exclude=None):
                assert generator is None
                draws.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())
                return original(q, queue, generator, exclude)

        trainer.model.negatives.__class__ = Recording
        trainer.train()
        rank = int(env["RANK"])
        q = trainer.model.queue
        seeded = [hashlib.sha1(torch.manual_seed(train_module.epoch_seed(cfg, r, 0)).get_state().numpy().tobytes())
                  .hexdigest() for r in range(2)]
        torch.save({"queue1": q.queue1, "queue2": q.queue2, "ptr": q.ptr, "draws": draws, "seeded": seeded},
                   Path(out) / f"rank{rank}.pt")
    except BaseException:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"error{env['RANK']}.txt").write_text(traceback.format_exc())
        raise


@pytest.mark.dist
def test_synco_on_two_processes_shares_its_queue_and_draws_per_rank_streams(tmp_path):
    """SynCo with synthetic negatives from the first step, 2 processes x batch 16: both ranks hold the very same
    queues (every rank's keys, all-gathered in rank order) and each rank draws its synthetic negatives from its own
    stream, seeded by (seed, rank, epoch); the losses are finite and the synthetic negatives took part."""
    out = tmp_path / "synco"
    overrides = TINY_OVERRIDES + SHORT + ["contrast.queue_size=64", "optim.batch_size=16"]
    codes = launch_ranks(_synco_rank, (str(out), overrides))
    errors = "".join(p.read_text() for p in out.glob("error*.txt"))
    assert codes == [0, 0] and not errors, (codes, errors)
    cfg = tiny_config(overrides)
    init = initial_state(cfg)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
    saved = load(out / "checkpoint.pt")["model"]
    for name in ("queue1", "queue2", "ptr"):
        assert torch.equal(r0[name], r1[name]), name
        assert torch.equal(r0[name], saved[f"queue.{name}"]), name  # and the checkpoint holds them
    # 2 steps x 32 keys filled the 64 slots: every key is new, and no rank's keys are missing (all-gathered)
    assert int(r0["ptr"]) == 0
    for name in ("queue1", "queue2"):
        assert not torch.isclose(r0[name], init[f"queue.{name}"]).all(dim=1).any(), name
    # two draws (one per view) per step, from each rank's own stream: rank r starts epoch 0 at epoch_seed(r, 0)
    assert len(r0["draws"]) == len(r1["draws"]) == 4
    assert r0["draws"][0] == r0["seeded"][0] and r1["draws"][0] == r0["seeded"][1] != r0["seeded"][0]
    assert all(a != b for a, b in zip(r0["draws"], r1["draws"]))
    assert len(set(r0["draws"])) == 4  # the stream moves on between draws
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["synthetic"] for r in records] == [1, 1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["synthetic_cos"]) for r in records)


# --- torch.compile --------------------------------------------------------------------------------------


@pytest.mark.slow  # inductor compiles ~17 C++ kernels with g++: 30-150 s cold on 2 busy cores, ~10 s when cached
def test_compile_matches_eager(tmp_path, fp32_eager):
    base, ref, ref_dir = fp32_eager
    out = train(tmp_path, "compiled", base + ["compile=true"])
    got = losses(out)
    assert len(got) == len(ref) == 1
    # Same maths, other kernels (fused elementwise ops, other summation orders): seen 2e-6 apart; gradients 9e-6,
    # weights 5e-8, BatchNorm statistics 6e-8, keys 1.4e-6 (the defaults: weights 1e-6, statistics and keys 1e-5).
    assert got == pytest.approx(ref, abs=1e-4, rel=0)
    assert_same_first_step(load(out / "checkpoint.pt"), load(ref_dir / "checkpoint.pt"), tiny_config(base),
                           grad_gap=1e-4)


@pytest.mark.dist
@pytest.mark.slow  # two fresh processes compile their graphs (sync BN, gradient buckets) at once: 1-2 min
def test_ddp_with_compile_equals_one_process(tmp_path):
    check_ddp(tmp_path, "compile", launch(tmp_path, ["compile"], start="spawn")["compile"])
