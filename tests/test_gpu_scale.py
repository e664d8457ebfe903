"""The GPU-scale engine, checked on the CPU: synchronised BatchNorm without host reads, a step that reads nothing
back from its device (run on torch's ``meta`` device, where any read of a value raises), float32 contrastive logits
under bf16 autocast, background checkpoints, timed checkpoints, and GPU presets that refuse to run on a CPU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from synco.config import load_config
from synco.engine import checkpoint as ckpt
from synco.engine.step import train_step
from synco.engine.syncbn import SyncBatchNorm1d, convert_sync_batchnorm
from synco.engine.train import Trainer, stop_at_step
from synco.errors import SyncoError
from synco.io import load_torch_file
from synco.losses import info_nce
from synco.models.method import create_model
from synco.options import layer_overrides

CPU = ["device=cpu", "precision=fp32"]


# ------------------------------------------------------------------------------ synchronised BatchNorm


def _bn_rank(rank: int, world: int, store: str, x: torch.Tensor, grad: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = SyncBatchNorm1d(x.shape[1], momentum=0.3)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        part = x.chunk(world)[rank].clone().requires_grad_(True)
        for _ in range(3):  # running statistics move, and with them the shift the sums are taken about
            y = bn(part)
        y.backward(grad.chunk(world)[rank])
        torch.save({"y": y.detach(), "dx": part.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "mean": bn.running_mean, "var": bn.running_var, "n": bn.num_batches_tracked}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_sync_batchnorm_is_batchnorm_over_the_global_batch(tmp_path, offset):
    """Two gloo processes with half a batch each give BatchNorm1d's outputs, input and parameter gradients (summed
    over the ranks, as DDP averages them) and running statistics over the whole batch: nn.SyncBatchNorm's maths,
    here in float64 as the reference. ``offset``: features whose mean is large against their spread (statistics
    taken as sums of squares about zero would lose them)."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g) * torch.linspace(0.1, 3, 6) + offset
    grad = torch.randn(16, 6, generator=g)
    start = "spawn" if torch.cuda.is_initialized() else "fork"  # never fork a process that holds a CUDA context
    mp.start_processes(_bn_rank, args=(2, str(tmp_path / "store"), x, grad, str(tmp_path / "out")), nprocs=2,
                       start_method=start)
    torch.manual_seed(0)
    ref = nn.BatchNorm1d(6, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ref = ref.double()
    xr = x.double().requires_grad_(True)
    for _ in range(3):
        y = ref(xr)
    y.backward(grad.double())
    got = [load_torch_file(tmp_path / f"out.{r}") for r in range(2)]

    def close(a, b, tol):
        torch.testing.assert_close(a.double(), b.detach(), rtol=tol, atol=tol)

    # float32 against float64: 1e-5, and 1e-4 where a mean of 100 leaves float32 a 1e-5 grain on a 0.1 spread
    tol = 1e-5 if offset == 0 else 1e-4
    close(torch.cat([o["y"] for o in got]), y, tol)
    close(torch.cat([o["dx"] for o in got]), xr.grad, tol)
    close(got[0]["dw"] + got[1]["dw"], ref.weight.grad, tol)
    close(got[0]["db"] + got[1]["db"], ref.bias.grad, tol)
    for o in got:
        close(o["mean"], ref.running_mean, tol)
        close(o["var"], ref.running_var, tol)
        assert int(o["n"]) == 3


def test_sync_batchnorm_reads_nothing_back(monkeypatch):
    """The synchronised path on the meta device (an all-reduce that sums two equal ranks): any read of a device
    value on the host (``.item()``, ``bool(t)``, a count copied back) raises there."""
    import synco.engine.syncbn as syncbn

    monkeypatch.setattr(syncbn.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(syncbn.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(syncbn, "all_reduce", lambda t: t * 2)
    bn = SyncBatchNorm1d(8).to("meta").train()
    x = torch.empty(4, 8, device="meta", requires_grad=True)
    bn(x).sum().backward()
    assert x.grad is not None and x.grad.device.type == "meta"


def test_convert_keeps_parameters_and_converts_only_1d():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Sequential(nn.BatchNorm1d(8)), nn.BatchNorm2d(3))
    weight = model[1].weight
    convert_sync_batchnorm(model, torch.device("cpu"))
    assert type(model[1]) is SyncBatchNorm1d and model[1].weight is weight
    assert type(model[2][0]) is SyncBatchNorm1d
    assert type(model[3]) is nn.BatchNorm2d  # torch has no CPU sync for 2-D BatchNorm: left per process


# ----------------------------------------------------------------------------- a step that never reads back


@pytest.fixture
def meta_device(monkeypatch):
    """Run on torch's meta device: shapes flow, values do not exist, so any host read raises. autocast has no meta
    device type (the bf16 region is a no-op there) and clipping's foreach kernels have no meta implementation."""
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clip(*a, **{**k, "foreach": False}))
    return torch.device("meta")


@pytest.mark.parametrize("method, accum", [("synco", 2), ("moby", 1), ("byol", 2)])
def test_training_step_reads_nothing_back_from_the_device(tiny_overrides, meta_device, method, accum):
    """Forward, synthetic negatives, loss, backward, clipping, AdamW, the EMA and the enqueue of a whole optimizer
    step (with gradient accumulation) on the meta device: the step issues no host sync of device values (on CUDA,
    what ``torch.cuda.set_sync_debug_mode('error')`` checks; tests/test_cuda.py does that on a GPU)."""
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, [f"method={method}"]))
    model = create_model(cfg).to(meta_device).train()
    optimizer = torch.optim.AdamW(model.online.parameters(), lr=1e-3, foreach=False)  # no meta kernels for fused
    x = torch.empty(8, 3, 16, 16, device=meta_device)
    for _ in range(2):
        sums = train_step(model, model.online, optimizer, [(x, x)] * accum, use_synthetic=method == "synco",
                          momentum=0.99, clip_grad=1.0, bf16=True)
    assert sums["loss"].device.type == "meta"
    if method == "synco":
        assert "synthetic_cos" in sums


def test_views_read_nothing_back_from_the_device():
    from synco.data.batch_augment import BatchViews, sample_seeds

    views = BatchViews(16).to("meta")
    for images in (torch.empty(8, 3, 20, 24, dtype=torch.uint8, device="meta"),
                   torch.empty(8, 2, 3, 16, 16, dtype=torch.uint8, device="meta")):
        x1, x2 = views(images, sample_seeds(0, 0, torch.arange(8)))
        assert x1.shape == x2.shape == (8, 3, 16, 16) and x1.device.type == "meta"


# ------------------------------------------------------------------------------ float32 contrastive logits


def test_contrastive_logits_are_float32_under_bf16_autocast(monkeypatch):
    """Inside the bf16 autocast of the step, InfoNCE computes its logits in float32: the same loss and statistics
    as outside autocast, to float32 rounding. (Under autocast a plain ``q @ queue.T`` is bf16, 0.02 apart in a
    logit at tau 0.2: the loss would differ by far more than the tolerance.)"""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(16, 32, generator=g), dim=1)
    k = F.normalize(q + 0.3 * torch.randn(16, 32, generator=g), dim=1)
    queue = F.normalize(torch.randn(256, 32, generator=g), dim=1)
    syn = F.normalize(torch.randn(16, 24, 32, generator=g), dim=2)
    ref, ref_stats = info_nce(q, k, queue, 0.2, syn)
    seen = []
    real_ce = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, *a, **kw: seen.append(logits.dtype) or real_ce(logits, *a,
                                                                                                           **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (q @ queue.t()).dtype == torch.bfloat16  # what the loss would see without its own float32 region
        got, stats = info_nce(q, k, queue, 0.2, syn)
        bf16_logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1).float() / 0.2
    assert seen == [torch.float32] and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for key, value in ref_stats.items():
        torch.testing.assert_close(stats[key], value, rtol=1e-6, atol=1e-6, msg=key)
    fp32_logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / 0.2
    assert (bf16_logits - fp32_logits).abs().max() > 1e-3  # bf16 logits are coarse: the check above can fail


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_writer_saves_a_snapshot_in_the_background(tmp_path):
    layer = nn.Linear(3, 2)
    writer = ckpt.CheckpointWriter()
    before = layer.weight.detach().clone()
    writer.save({"model": layer.state_dict(), "step": 7}, tmp_path / "c.pt")
    with torch.no_grad():
        layer.weight.add_(1.0)  # training goes on while the file is written: the snapshot must not see it
    writer.wait()
    saved = load_torch_file(tmp_path / "c.pt")
    assert saved["step"] == 7 and torch.equal(saved["model"]["weight"], before)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left


def test_checkpoint_writer_reraises_a_failed_write(tmp_path):
    writer = ckpt.CheckpointWriter()
    writer.save({"x": torch.zeros(2)}, tmp_path / "missing-folder" / "c.pt")
    with pytest.raises(SyncoError, match="cannot write"):
        writer.wait()
    writer.wait()  # raised once, then clear


class _CountingTrainer(Trainer):
    def save(self):
        self.saved_steps = getattr(self, "saved_steps", []) + [(self.state.step, self.state.batch_in_epoch)]
        super().save()


@pytest.mark.parametrize("minutes, log_every, expected", [
    (0.0, 1, [(4, 0), (8, 0)]),  # epoch ends only
    (1e-9, 1, [(1, 1), (2, 2), (3, 3), (4, 0), (5, 1), (6, 2), (7, 3), (8, 0)]),  # due at every logged step
    (1e-9, 3, [(3, 3), (4, 0), (6, 2), (8, 0)]),  # the clock is read at logged steps only
])
def test_timed_checkpoints_at_logged_steps(tmp_path, tiny_overrides, minutes, log_every, expected):
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, ["method=moby",
                                                          f"ckpt_every_minutes={minutes}", f"log_every={log_every}"]))
    trainer = _CountingTrainer(cfg, tmp_path / "run", progress=False)
    trainer.train()
    assert trainer.saved_steps == expected
    assert load_torch_file(tmp_path / "run" / "checkpoint.pt")["step"] == 8


def test_a_run_stopped_by_a_hook_has_its_checkpoint_on_disk(tmp_path, tiny_overrides):
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, ["method=moby"]))
    trainer = Trainer(cfg, tmp_path / "run", progress=False, step_hooks=(stop_at_step(2),))
    trainer.train()
    assert load_torch_file(tmp_path / "run" / "checkpoint.pt")["step"] == 2  # written before train() returned


# ---------------------------------------------------------------------------------- no silent CPU, records


@pytest.mark.slow  # a fresh interpreter without CUDA: about 5 s
def test_gpu_presets_stop_at_once_without_a_gpu(tmp_path):
    """CUDA hidden (the same on every machine): the DeiT-S preset stops before touching --out, in one paragraph
    that names device=cpu; with device=cpu the device check passes."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "synco", "pretrain", "--config", "synco-imagenet-deit-s",
                           f"data.root={tmp_path}", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("synco: error:")]
    assert len(error) == 1 and "device=cpu" in error[0] and "GPU" in error[0]
    assert not out.exists()


@pytest.mark.parametrize("preset", ["synco-imagenet-deit-s", "byol-imagenet-swin-t", "imagenet100-deit-s",
                                    "syn2co-imagenet100-swin-t", "synby-imagenet-deit-s", "moby-imagenet-swin-t"])
def test_every_gpu_preset_asks_for_cuda(preset, monkeypatch):
    from synco.device import resolve_device

    cfg = load_config(preset, ["data.root=/data", "data.synthetic_root=/synthetic"])
    assert cfg.device == "cuda" and cfg.data.augment.on == "device" and cfg.ckpt_every_minutes > 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SyncoError, match="device=cpu"):
        resolve_device(cfg.device)


def test_compile_covers_the_target_and_the_loss(tmp_path, tiny_overrides):
    """``compile=true`` wraps the online encoder, compiles the target encoder in place (its parameter names, which
    the EMA pairs, are unchanged) and the loss functions. Nothing runs here: compiling is lazy."""
    from torch._dynamo.eval_frame import OptimizedModule

    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, ["compile=true"]))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert isinstance(trainer.online, OptimizedModule)
    assert trainer.model.target._compiled_call_impl is not None
    names = [n for n, _ in trainer.model.target.named_parameters()]
    assert names and not any("_orig_mod" in n for n in names)
    assert trainer.model._info_nce is not info_nce and hasattr(trainer.model._info_nce, "__wrapped__")


def test_summary_records_the_environment(tmp_path, tiny_overrides):
    import json

    from synco.pretrain import pretrain

    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, ["epochs=1"]))
    pretrain(cfg, tmp_path / "run", progress=False)
    env = json.loads((tmp_path / "run" / "summary.json").read_text())["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["world_size"] == 1
    assert env["cuda"] == torch.version.cuda and env["device_name"]


# ------------------------------------------------------------------------------------------ review fixes


def _compile_rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), SyncBatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
        x = torch.randn(8, 4).chunk(2)[rank].clone().requires_grad_(True)
        eager = model(x)
        eager.sum().backward()
        grad, x.grad = x.grad.clone(), None
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)  # a graph break would raise
        compiled.sum().backward()
        torch.save({"same": torch.allclose(eager, compiled, atol=1e-6) and torch.allclose(grad, x.grad, atol=1e-6)},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_sync_batchnorm_compiles_without_a_graph_break(tmp_path):
    """Under DDP, torch.compile traces through the synchronised BatchNorm (torch.distributed.nn's all-reduce ended
    compilation of the rest of the frame at the first one): fullgraph=True holds, and results equal eager."""
    import torch.multiprocessing as mp

    start = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_compile_rank, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       start_method=start)
    assert all(load_torch_file(tmp_path / f"out.{r}")["same"] for r in range(2))


def test_shared_memory_is_shared_by_the_processes_of_a_node(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from synco.engine.data import prefetch_factor

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, 2 * 2**30))  # 2 GB /dev/shm
    batch = 37 * 2**20  # a DeiT-S batch of 128 x 2 uint8 crops
    assert prefetch_factor(8, batch, tmp_path) == 2  # one process: 600 MB of 1 GB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four: 256 MB each
    with pytest.raises(SyncoError, match="per process of this node"):
        prefetch_factor(8, batch, tmp_path)


def test_a_large_batch_opens_a_bounded_number_of_files(tmp_path):
    """Headers are read ahead of their decode, each holding its file open: a batch of 150 keys must not hold 150
    at once (a per-rank batch near the usual 1024 limit failed with EMFILE, its images recorded as bad)."""
    import resource

    from PIL import Image

    from synco.engine.data import PretrainData

    for k in range(150):
        out = tmp_path / "train" / "ab"[k % 2]
        out.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 20), (k, 40, 90)).save(out / f"{k}.jpg")
    cfg = load_config("cpu-demo", CPU + [f"data.root={tmp_path}", "data.augment.on=device", "data.num_workers=0"])
    data = PretrainData(cfg.data, batch_size=150, seed=0, bad_image_log=tmp_path / "bad.txt")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 100, hard))  # room for 100 open files, not 150
    try:
        items = data.dataset.__getitems__([(0, i) for i in range(150)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(items) == 150 and not (tmp_path / "bad.txt").exists()


def test_an_image_that_fails_to_convert_is_skipped(tmp_path, monkeypatch):
    """Lazy decoding converts inside the guarded decode: a mode PIL cannot convert is a bad image, not a crash."""
    from PIL import Image

    import synco.data.folder as folder
    from synco.engine.data import PretrainData

    for k in range(4):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (60 * k, 0, 0)).save(tmp_path / "train" / "a" / f"{k}.png")
    real = folder.to_rgb
    monkeypatch.setattr(folder, "to_rgb", lambda img: (_ for _ in ()).throw(ValueError("conversion not supported"))
                        if img.getpixel((0, 0))[0] == 0 else real(img))
    cfg = load_config("cpu-demo", CPU + [f"data.root={tmp_path}", "data.num_workers=0"])
    data = PretrainData(cfg.data, batch_size=4, seed=0, bad_image_log=tmp_path / "bad.txt")
    items = data.dataset.__getitems__([(0, i) for i in range(4)])
    assert len(items) == 4 and (tmp_path / "bad.txt").read_text().strip().endswith("0.png")


def test_a_failed_checkpoint_write_does_not_hide_the_error_that_stopped_training(tmp_path, tiny_overrides, caplog):
    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, CPU, ["method=moby"]))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)

    def failed_write():
        raise SyncoError("disk full: 123 bytes needed")

    trainer.writer.wait = failed_write
    trainer._wind_down((x for x in ()), failing=True)  # logged, not raised: the original error goes on
    assert "could not be written" in caplog.text
    with pytest.raises(SyncoError, match="disk full"):
        trainer._wind_down(x for x in ())


def test_checkpoint_writer_writes_in_place_when_no_thread_can_start(tmp_path, monkeypatch):
    """A process or thread limit ("can't start new thread", seen on a loaded machine) must not lose the
    checkpoint or leave the writer unusable: the write happens in the calling thread."""
    import threading

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    writer = ckpt.CheckpointWriter()
    writer.save({"step": 3, "w": torch.ones(2)}, tmp_path / "c.pt")
    writer.wait()
    assert load_torch_file(tmp_path / "c.pt")["step"] == 3
    writer.save({"step": 4}, tmp_path / "c.pt")  # and again
    writer.wait()
    assert load_torch_file(tmp_path / "c.pt")["step"] == 4
