"""The real trainer on a CUDA GPU (skipped without one; ``benchmarks/gpu_check.sh`` runs this file first).

What each test compares, with the tolerance stated next to it:

* bf16 autocast against fp32 (losses and weights after 2 steps);
* ``compile=true`` (Triton kernels) against eager (losses and weights);
* a steady-state step (views made on the GPU, forward, synthetic negatives, loss, backward, AdamW, EMA, enqueue)
  under ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises;
* 2 GPUs x batch b against 1 GPU x batch 2b under NCCL (needs 2 GPUs): the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from synco.config import load_config
from synco.engine.train import Trainer
from synco.io import load_torch_file
from synco.options import layer_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHORT = ["epochs=1", "data.max_images=64", "data.num_workers=0", "model.drop_path_online=0.0", "device=cuda"]


def _losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _train(tmp_path, name, overrides) -> tuple[list[float], dict]:
    from conftest import TINY_OVERRIDES

    cfg = load_config("cpu-demo", layer_overrides(TINY_OVERRIDES, SHORT, overrides))
    Trainer(cfg, tmp_path / name, progress=False).train()
    return _losses(tmp_path / name), load_torch_file(tmp_path / name / "checkpoint.pt")["model"]


def _weights_close(a: dict, b: dict, atol: float) -> None:
    for k, v in a.items():
        if v.is_floating_point() and not k.startswith("queue"):
            torch.testing.assert_close(b[k].float(), v.float(), rtol=0, atol=atol, msg=k)


def test_bf16_against_fp32_on_cuda(tmp_path):
    ref, w_ref = _train(tmp_path, "fp32", ["precision=fp32"])
    got, w_got = _train(tmp_path, "bf16", ["precision=bf16"])
    assert len(ref) == len(got) == 2 and got != ref  # bf16 really ran
    assert got == pytest.approx(ref, rel=1e-2)  # 8 mantissa bits: ~2e-3 relative per op
    _weights_close(w_ref, w_got, atol=5e-2)  # 2 AdamW steps of lr ~1e-2 each, bf16 activations


def test_compile_against_eager_on_cuda(tmp_path):
    ref, w_ref = _train(tmp_path, "eager", ["precision=fp32"])
    got, w_got = _train(tmp_path, "compiled", ["precision=fp32", "compile=true"])
    assert got == pytest.approx(ref, abs=1e-3, rel=0)  # other kernels, other summation orders (TF32 off: fp32)
    _weights_close(w_ref, w_got, atol=2e-2)


@pytest.mark.parametrize("method", ["synco", "byol"])
def test_a_steady_state_step_never_syncs(tmp_path, method):
    """Views on the GPU from a loader batch, then whole optimizer steps, under sync-debug mode "error"."""
    from conftest import TINY_OVERRIDES

    cfg = load_config("cpu-demo", layer_overrides(TINY_OVERRIDES, SHORT, [f"method={method}", "precision=bf16"]))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.model.train()
    loader = trainer.data.loader(0)
    batches = [b for b, _ in loader]
    views = [trainer.data.views(b, 0, trainer.device) for b in batches]
    trainer.step([views[0]], use_synthetic=method == "synco")  # warm-up: allocator, cuBLAS handles, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches:
            v = trainer.data.views(b, 0, trainer.device)
            sums, _ = trainer.step([v], use_synthetic=method == "synco")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(sums["loss"]).item()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_equal_one_gpu_with_double_batch(tmp_path):
    from conftest import TINY_OVERRIDES

    base = layer_overrides(TINY_OVERRIDES, ["method=moby", "model.drop_path_online=0.0", "epochs=2",
                                            "contrast.queue_size=64", "device=cuda", "precision=fp32",
                                            "data.num_workers=0"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc, batch in ((one, 1, 32), (two, 2, 16)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "synco", "pretrain", "--no-progress", "--out", str(out),
               *layer_overrides(base, [f"optim.batch_size={batch}"])]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)  # NCCL sums in another order
    a, b = load_torch_file(one / "checkpoint.pt")["model"], load_torch_file(two / "checkpoint.pt")["model"]
    _weights_close(a, b, atol=1e-3)
    torch.testing.assert_close(a["queue.queue1"], b["queue.queue1"], rtol=0, atol=1e-4)
