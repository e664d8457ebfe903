"""Regression cases of issue 12: no traceback, no silently wrong result, nothing lost.

Each test names the issue item it covers. CLI cases run ``synco`` in-process (one import) and check the
exit code and that stderr is one ``synco: error:`` paragraph without a traceback."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synco.cli.main import main
from synco.config import load_config
from synco.errors import Interrupted, SyncoError
from synco.io import load_torch_file as load
from synco.options import layer_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_KW = "model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"


def cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def assert_clean_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err and "Original" not in err, err
    last = [line for line in err.strip().splitlines() if line.strip()][-1]
    assert last.startswith("synco: error:"), err
    for needle in needles:
        assert needle in last, (needle, last)


def pretrain(capsys, out, tiny, *extra):
    # the tiny config, then the test's own keys replacing its values (one value per key reaches synco)
    return cli(capsys, "pretrain", "--no-progress", "--out", str(out),
               *layer_overrides(tiny, ["data.num_workers=0"], list(extra)))


# ---------------------------------------------------------------------------------------------
# Config values: tracebacks -> one paragraph, exit 2


@pytest.mark.parametrize("override, key", [
    ("optim.base_lr=nan", "optim.base_lr"),
    ("optim.base_lr=.inf", "optim.base_lr"),
    ("optim.weight_decay=nan", "optim.weight_decay"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.min_lr=nan", "optim.min_lr"),
    ("optim.clip_grad=nan", "optim.clip_grad"),
    ("optim.clip_grad=0", "optim.clip_grad"),
    ("optim.warmup_epochs=nan", "optim.warmup_epochs"),
    ("optim.betas=[2,3]", "optim.betas"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("optim.betas=[0.9,.nan]", "optim.betas"),
    ("optim.batch_size=1", "optim.batch_size"),
    ("contrast.temperature=nan", "contrast.temperature"),
    ("contrast.temperature=.inf", "contrast.temperature"),
    ("contrast.momentum_start=nan", "contrast.momentum_start"),
    ("model.drop_path_online=nan", "model.drop_path_online"),
    ("negatives.alpha_max=nan", "negatives.alpha_max"),
    ("negatives.sigma=.inf", "negatives.sigma"),
    ("data.synthetic_ratio=nan", "data.synthetic_ratio"),
    ("data.augment.flip_p=nan", "data.augment.flip_p"),
    ("data.augment.crop_ratio=[0.75,.inf]", "data.augment.crop_ratio"),
    ("knn.temperature=nan", "knn.temperature"),
    ("knn.k=[0]", "knn.k"),
    ("knn.k=[]", "knn.k"),
    ("log_every=0", "log_every"),
    ("ckpt_every_steps=-1", "ckpt_every_steps"),
    ("seed=99999999999999999999", "seed"),
    ("seed=-1", "seed"),
    ("data.image_size=32", "data.image_size"),  # the cpu-demo backbone is built for 16 px
])
def test_bad_config_values_are_one_paragraph(tmp_path, capsys, override, key):
    rc, err = cli(capsys, "pretrain", "--no-progress", "--out", str(tmp_path / "r"), override)
    assert_clean_error(rc, err, key)
    assert not (tmp_path / "r").exists()  # refused before any work


def test_image_size_error_gives_the_override_that_works(capsys, tmp_path):
    rc, err = cli(capsys, "pretrain", "--out", str(tmp_path), "data.image_size=32")
    fix = err.split("Set both, e.g. ")[1].split(", or keep")[0]
    cfg = load_config("cpu-demo", [a.strip("'") for a in fix.split(" ", 1)])
    assert cfg.data.image_size == 32 and cfg.model.backbone_kwargs["img_size"] == 32


def test_backbone_without_img_size_follows_data_image_size():
    from synco.models.backbone import backbone_from_config

    cfg = load_config("cpu-demo", ["model.backbone=vit_tiny_patch16_224",
                                   "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                                   "data.image_size=32"])
    assert cfg.model.backbone_kwargs["img_size"] == 32
    assert backbone_from_config(cfg.model)(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_short_runs_clamp_the_warmup_with_a_warning(caplog):
    cfg = load_config("cpu-demo", ["epochs=1"])  # the preset's warm-up is 3 epochs
    assert cfg.optim.warmup_epochs == 1
    assert "optim.warmup_epochs=3 is more than epochs=1" in caplog.text
    assert "no synthetic negatives in this run" in caplog.text  # window [3, -4) is empty: say it is MoBY


def test_data_root_without_dataset_means_folder(tiny_imagefolder, caplog):
    cfg = load_config("cpu-demo", [f"data.root={tiny_imagefolder}"])
    assert cfg.data.dataset == "folder" and "using data.dataset=folder" in caplog.text


def test_data_root_without_dataset_trains_on_the_folder(tmp_path, capsys, tiny_overrides, tiny_imagefolder):
    rc, err = pretrain(capsys, tmp_path / "r", tiny_overrides, f"data.root={tiny_imagefolder}", "epochs=1",
                       "optim.batch_size=6", "contrast.queue_size=12", "negatives.n_hard=4")
    assert rc == 0, err
    import yaml

    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["data"]["dataset"] == "folder"
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["real_images"] for r in records if r.get("epoch_end")] == [18]  # the folder's 18, not 1437 digits


# ---------------------------------------------------------------------------------------------
# Output locations, checked before any work


@pytest.mark.parametrize("where", ["file", "under_file", "proc", "sys", "readonly"])
def test_unwritable_out_is_refused_up_front(tmp_path, capsys, monkeypatch, where):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = {"file": afile, "under_file": afile / "run", "proc": Path("/proc/synco-run"),
           "sys": Path("/sys/synco-run"), "readonly": tmp_path / "ro"}[where]
    if where == "readonly":
        import tempfile

        def erofs(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", erofs)
    for argv in (["pretrain", "--no-progress", "--out", str(out), "device=cpu"],
                 ["eval", "knn", "--checkpoint", "random", "backbone=cpu-demo", "--out", str(out), "--no-progress",
                  "device=cpu"]):
        rc, err = cli(capsys, *argv)
        assert_clean_error(rc, err, "--out")


def test_eval_out_is_checked_before_features_are_extracted(tmp_path, capsys, monkeypatch):
    from synco.eval import knn_protocol

    def boom(*a, **k):
        raise AssertionError("features were extracted before the output folder was checked")

    monkeypatch.setattr(knn_protocol, "extract_features", boom)
    (tmp_path / "f").write_text("x")
    rc, err = cli(capsys, "eval", "knn", "device=cpu", "--checkpoint", "random", "backbone=cpu-demo", "--out",
                  str(tmp_path / "f"))
    assert_clean_error(rc, err, "existing file")


# ---------------------------------------------------------------------------------------------
# Disk full; temp files


def _enospc_save(real_save):
    def save(obj, f, *a, **k):
        if hasattr(f, "fileno"):  # a real file: write a little, then fail as a full disk does
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
                errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    return save


def test_disk_full_names_the_size_and_path_and_leaves_no_temp(tmp_path, monkeypatch):
    from synco import io

    obj = {"w": torch.zeros(1000)}
    monkeypatch.setattr(io.torch, "save", _enospc_save(torch.save))
    with pytest.raises(SyncoError) as e:
        io.atomic_save(obj, tmp_path / "checkpoint.pt")
    monkeypatch.undo()
    import io as pyio

    buf = pyio.BytesIO()
    torch.save(obj, buf)
    assert f"disk full: {len(buf.getvalue())} bytes needed at {tmp_path / 'checkpoint.pt'}" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_pretraining_is_one_paragraph(tmp_path, capsys, monkeypatch, tiny_overrides):
    from synco import io

    monkeypatch.setattr(io.torch, "save", _enospc_save(torch.save))
    rc, err = pretrain(capsys, tmp_path, tiny_overrides, "epochs=1")
    assert_clean_error(rc, err, "disk full:", "bytes needed at", "checkpoint.pt")
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or p.name == ".synco.lock"]


def test_leaked_temp_files_are_removed_at_start(tmp_path, capsys, tiny_overrides):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leaked = tmp_path / f".checkpoint.pt.tmp{dead.pid}"
    leaked.write_bytes(b"half a checkpoint")
    mine = tmp_path / f".other.tmp{os.getpid()}"  # a live writer's temp file is left alone... (ours: removed)
    # alive until this test closes its stdin or kills it (not for a time that a slow run could outlast)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        theirs = tmp_path / f".metrics.jsonl.tmp{live.pid}"
        theirs.write_text("x")
        mine.write_text("x")
        rc, err = pretrain(capsys, tmp_path, tiny_overrides, "epochs=1")
        assert rc == 0, err
        assert not leaked.exists() and not mine.exists() and theirs.exists()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------
# Lock on --out (item 2)


def test_second_run_on_the_same_out_is_refused_naming_the_pid(tmp_path, capsys, tiny_overrides):
    from synco.io import DirLock, _start_time

    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (tmp_path / DirLock.NAME).write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename,
                                                         "start": _start_time(other.pid)}))
        rc, err = pretrain(capsys, tmp_path, tiny_overrides, "epochs=1")
        assert_clean_error(rc, err, f"PID {other.pid}", "in use")
        assert not (tmp_path / "checkpoint.pt").exists()
    finally:
        other.kill()
        other.wait()
    # the owner died (SIGKILL leaves its lock): the same command now runs / resumes
    rc, err = pretrain(capsys, tmp_path, tiny_overrides, "epochs=1")
    assert rc == 0, err
    assert not (tmp_path / DirLock.NAME).exists()


def test_lock_of_a_reused_pid_or_garbage_is_stale(tmp_path):
    from synco.io import DirLock

    lock_file = tmp_path / DirLock.NAME
    lock_file.write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "start": "0"}))
    with DirLock(tmp_path):  # alive PID but another start time: not the process that took the lock
        pass
    lock_file.write_text("")  # a half-written lock: its writer died while creating it
    with DirLock(tmp_path) as lock:
        other = DirLock(tmp_path)
        other._stale = lambda owner: False  # as seen from another process: this one is alive
        with pytest.raises(SyncoError, match=f"PID {os.getpid()}"):
            other.acquire()
        assert lock.held and json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()


def test_lock_refusal_names_the_holders_command_not_the_requesters(tmp_path):
    """A fine-tune holds the folder; a k-NN refused there must say a fine-tune is there (it used to name its own
    command: "in use by another synco evaluation (knn)")."""
    from synco.io import DirLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys; from synco.io import DirLock; "
                               f"DirLock({str(tmp_path)!r}, 'evaluation (finetune)').acquire(); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # a handshake, not a sleep
        with pytest.raises(SyncoError) as e:
            DirLock(tmp_path, "evaluation (knn)").acquire()
        assert "another synco evaluation (finetune)" in str(e.value) and "(knn)" not in str(e.value)
        assert f"PID {holder.pid}" in str(e.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


# ---------------------------------------------------------------------------------------------
# Throughput over resume segments (item 3)


def test_rerun_and_resume_keep_the_whole_run_throughput(tmp_path, capsys, tiny_overrides):
    from synco.engine.train import Trainer, stop_at_step

    cfg = load_config("cpu-demo", layer_overrides(tiny_overrides, ["data.num_workers=0"]))
    Trainer(cfg, tmp_path, progress=False, step_hooks=(stop_at_step(3),)).train()  # segment 1: steps 0..3, then "killed"
    rc, err = pretrain(capsys, tmp_path, tiny_overrides)  # segment 2: steps 3..8
    assert rc == 0, err
    first = json.loads((tmp_path / "summary.json").read_text())
    segs = first["train_segments"]
    assert [(s["start_step"], s["end_step"]) for s in segs] == [(0, 3), (3, 8)]
    assert first["train_images"] == 8 * 32
    assert first["train_seconds"] == pytest.approx(sum(s["seconds"] for s in segs))
    assert first["images_per_second"] == pytest.approx(256 / first["train_seconds"])
    rc, err = pretrain(capsys, tmp_path, tiny_overrides)  # a re-run of the finished run trains nothing
    assert rc == 0, err
    again = json.loads((tmp_path / "summary.json").read_text())
    for key in ("images_per_second", "train_seconds", "train_images", "train_segments"):
        assert again[key] == first[key], key


# ---------------------------------------------------------------------------------------------
# Signals


def test_signal_during_training_writes_a_checkpoint_at_the_step_and_resumes_exactly(tmp_path, tiny_overrides):
    from synco.engine import signals
    from synco.engine.train import Trainer
    from synco.models import method

    over = layer_overrides(tiny_overrides, ["epochs=2", "deterministic=true", "data.num_workers=0"])
    cfg = load_config("cpu-demo", over)
    Trainer(cfg, tmp_path / "full", progress=False).train()

    original = method.SelfSupervisedModel.loss
    calls = {"n": 0}

    def loss(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            signals.simulate(signal.SIGTERM)  # arrives during step 3
        return original(self, *a, **k)

    method.SelfSupervisedModel.loss = loss
    try:
        with signals.handle_signals(), pytest.raises(Interrupted) as e:
            with signals.deferred():
                Trainer(cfg, tmp_path / "split", progress=False).train()
    finally:
        method.SelfSupervisedModel.loss = original
    assert e.value.exit_code == 143 and "after step 3" in str(e.value)
    state = load(tmp_path / "split" / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)  # mid-epoch, nothing lost
    Trainer(cfg, tmp_path / "split", progress=False).train()
    a, b = load(tmp_path / "full" / "checkpoint.pt")["model"], load(tmp_path / "split" / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow  # a `synco pretrain` process with a DataLoader worker: ~6 s each on 2 busy cores
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_real_signal_to_pretrain_says_so_and_keeps_the_step(tmp_path, tiny_overrides, sig):
    """A real signal to a training `synco pretrain` (with a DataLoader worker): it finishes the step in progress,
    writes a checkpoint of it and stops (128 + signal). The signal is sent once the run is paused inside step 5
    (a handshake file), and the run goes on only once the signal is recorded: the step is known, no clock."""
    from conftest import paused_synco, wait_for

    out, ready = tmp_path / "run", tmp_path / "paused"
    args = ["pretrain", "--no-progress", "--out", str(out), *layer_overrides(tiny_overrides, ["epochs=40", "data.max_images=64",
            "data.num_workers=1"])]
    proc = paused_synco(args, step=5, until="signal", ready=ready, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    try:
        wait_for(ready.exists, "pause at step 5", proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "received: stopped after step 5 (epoch 2)" in err, err
    assert load(out / "checkpoint.pt")["step"] == 5
    assert not (out / ".synco.lock").exists()


def test_signal_outside_training_stops_at_once_with_a_message(capsys, monkeypatch, tmp_path):
    from synco.engine import signals
    from synco.eval import report

    def slow(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(report, "write_report", slow)
    before = signal.getsignal(signal.SIGTERM)
    rc, err = cli(capsys, "report", str(tmp_path))
    assert rc == 143 and "SIGTERM received: stopped" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before and before is not signals._handler  # restored


def test_killed_worker_messages():
    from synco.cli.main import worker_killed

    try:
        try:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated. ")
        except RuntimeError as inner:
            raise RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly") from inner
    except RuntimeError as e:
        message, code = worker_killed(e)
    assert code == 143 and "SIGTERM" in message
    message, code = worker_killed(RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed. "))
    assert code == 2 and "num_workers" in message
    assert worker_killed(RuntimeError("something else")) is None


# ---------------------------------------------------------------------------------------------
# Corrupt files


def test_all_images_corrupt_is_one_paragraph_not_a_worker_traceback(tmp_path, capsys, tiny_overrides):
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "data" / "train" / cls / f"{i}.png").write_bytes(b"not a png")
    rc, err = cli(capsys, "pretrain", "--no-progress", "--out", str(tmp_path / "r"), *layer_overrides(tiny_overrides, ["data.dataset=folder", f"data.root={tmp_path / 'data'}", "data.num_workers=1",
                  "optim.batch_size=4", "contrast.queue_size=16", "negatives.n_hard=4", "epochs=1"]))
    assert_clean_error(rc, err, "could not be read")
    assert "worker process" not in err


@pytest.mark.slow  # a subprocess with a DataLoader worker: about 8 s
def test_a_failed_run_with_workers_exits(tmp_path, tiny_overrides):
    """Workers ignore SIGTERM (a scheduler's signal is the main process's to handle), so workers left running by an
    error could not be terminated at exit and the process hung after printing its error: training now stops them
    on every way out."""
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "data" / "train" / cls / f"{i}.png").write_bytes(b"not a png")
    cmd = [sys.executable, "-m", "synco", "pretrain", "--no-progress", "--out", str(tmp_path / "r"), *layer_overrides(tiny_overrides, ["data.dataset=folder", f"data.root={tmp_path / 'data'}", "data.num_workers=1", "optim.batch_size=4",
           "contrast.queue_size=16", "negatives.n_hard=4", "epochs=1"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)  # hung forever before the fix
    assert done.returncode == 2 and "could not be read" in done.stderr


def test_corrupt_checkpoint_message_has_no_weights_only_advice(tmp_path, capsys):
    import argparse

    evil = tmp_path / "evil"
    evil.mkdir()  # a Python object a weights-only load refuses: torch's message advises weights_only=False
    torch.save({"config": {}, "model": {}, "x": argparse.Namespace(a=1)}, evil / "checkpoint.pt")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    buf = (evil / "checkpoint.pt").read_bytes()
    (trunc / "checkpoint.pt").write_bytes(buf[: len(buf) // 2])
    for run in (evil, trunc):
        rc, err = cli(capsys, "eval", "knn", "device=cpu", "--checkpoint", str(run), "--no-progress")
        assert_clean_error(rc, err, "cannot read")
        assert "weights_only" not in err and "trust" not in err


def test_safetensors_metadata_without_backbone(tmp_path, capsys):
    from safetensors.torch import save_file

    from synco.models.backbone import load_backbone

    for i, meta in enumerate(({"synco": json.dumps({"backbone_kwargs": {}})}, {"synco": "not json"},
                              {"synco": json.dumps(["list"])})):
        path = tmp_path / f"b{i}.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata=meta)
        with pytest.raises(SyncoError, match="metadata"):
            load_backbone(str(path))
        rc, err = cli(capsys, "eval", "knn", "device=cpu", "--checkpoint", str(path), "--out", str(tmp_path / "e"))
        assert_clean_error(rc, err, "metadata")


def _one_shot_run(run_dir: Path, seed: int, mtime=None):
    """A run dir as `synco pretrain` leaves it (checkpoint.pt only), with backbone weights from ``seed``."""
    from synco.models.backbone import backbone_from_config

    cfg = load_config("cpu-demo", [TINY_KW])
    torch.manual_seed(seed)
    bb = backbone_from_config(cfg.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "model": {f"online.backbone.{k}": v for k, v in bb.state_dict().items()},
                "epoch": 1}, run_dir / "checkpoint.pt")
    if mtime is not None:
        os.utime(run_dir / "checkpoint.pt", ns=(mtime, mtime))


KNN_OPTS = ["--no-progress", "device=cpu", "num_workers=0", "k=[1,20]"]


def test_knn_cache_follows_the_weights_not_the_path(tmp_path, capsys):
    run = tmp_path / "run"
    _one_shot_run(run, seed=1)
    stamp = (run / "checkpoint.pt").stat().st_mtime_ns
    assert cli(capsys, "eval", "knn", "--checkpoint", str(run), *KNN_OPTS)[0] == 0
    first = json.loads((run / "eval" / "knn.json").read_text())["results"]
    _one_shot_run(run, seed=2, mtime=stamp)  # the run went on: new weights, same path, even the same mtime
    assert cli(capsys, "eval", "knn", "--checkpoint", str(run), *KNN_OPTS)[0] == 0
    second = json.loads((run / "eval" / "knn.json").read_text())["results"]
    assert second != first
    # and they are the numbers of the new weights: the same as without any cache
    assert cli(capsys, "eval", "knn", "--checkpoint", str(run), "--out", str(tmp_path / "fresh"), "cache=false",
               *KNN_OPTS)[0] == 0
    assert json.loads((tmp_path / "fresh" / "knn.json").read_text())["results"] == second
    # a truncated cache is rebuilt, not a traceback
    cache = run / "eval" / "knn_features.pt"
    cache.write_bytes(cache.read_bytes()[:100])
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", str(run), *KNN_OPTS)
    assert rc == 0, err
    assert json.loads((run / "eval" / "knn.json").read_text())["results"] == second
    torch.load(cache, weights_only=True)  # rewritten whole


def test_cache_key_is_a_hash_of_the_weights():
    from synco.eval.knn_protocol import weights_digest
    from synco.models.backbone import create_backbone

    torch.manual_seed(0)
    a = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    b = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.cls_token[0, 0, 0] += 1e-6
    assert weights_digest(a) != weights_digest(b)


# ---------------------------------------------------------------------------------------------
# 16-bit PNGs (item 5)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from synco.data.folder import SafeImageFolder, to_rgb

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(ramp).save(tmp_path / "a" / "x.png")
    img, _ = SafeImageFolder(tmp_path)[0]
    a = np.asarray(img)
    assert img.mode == "RGB" and a.shape == (64, 64, 3)
    assert len(np.unique(a[..., 0])) == 256  # a full grey ramp, not 2 levels
    np.testing.assert_allclose(a[..., 0].astype(float), ramp / 257.0, atol=0.5 + 1e-9)
    # 32-bit 'I' holding 16-bit values, and float images in [0, 1]
    as_i = Image.fromarray(ramp.astype(np.int32))
    assert np.asarray(to_rgb(as_i))[..., 0].max() == 255
    as_f = Image.fromarray((ramp / 65535.0).astype(np.float32))
    assert np.asarray(to_rgb(as_f))[..., 0].max() == 255
    rgb = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    assert to_rgb(rgb) is rgb


# ---------------------------------------------------------------------------------------------
# Meaningless metrics (item 6)


def test_knn_rejects_k0_and_one_class():
    from synco.eval.knn import knn_classify

    x = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)
    y = torch.arange(20) % 2
    with pytest.raises(SyncoError, match="k must be an integer >= 1"):
        knn_classify(x, y, x, y, ks=[0])
    with pytest.raises(SyncoError, match="at least two classes"):
        knn_classify(x, torch.zeros(20, dtype=torch.long), x, torch.zeros(20, dtype=torch.long), ks=[5])


@pytest.fixture
def one_class_folder(tmp_path, tiny_imagefolder):
    import shutil

    root = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(tiny_imagefolder / split / "indoor", root / split / "indoor")
    return root


@pytest.mark.parametrize("protocol", ["knn", "linear", "finetune"])
def test_one_class_evaluations_are_refused(tmp_path, capsys, one_class_folder, protocol):
    rc, err = cli(capsys, "eval", protocol, "device=cpu", "--checkpoint", "random", "backbone=cpu-demo", "--out",
                  str(tmp_path / "e"), "dataset=folder", f"root={one_class_folder}", "--no-progress")
    assert_clean_error(rc, err, "1 class")


def test_eval_knn_k0_is_refused(tmp_path, capsys):
    rc, err = cli(capsys, "eval", "knn", "device=cpu", "--checkpoint", "random", "backbone=cpu-demo", "--out",
                  str(tmp_path), "k=[0]", "--no-progress")
    assert_clean_error(rc, err, "option 'k': every value must be >= 1")


def test_end_of_run_knn_on_one_class_is_skipped_with_a_note(tmp_path, one_class_folder):
    from synco.eval.knn_protocol import evaluate_run
    from synco.models.backbone import backbone_from_config

    cfg = load_config("cpu-demo", [TINY_KW, "data.dataset=folder", f"data.root={one_class_folder}",
                                   "data.num_workers=0"])
    out = evaluate_run(cfg, backbone_from_config(cfg.model), torch.device("cpu"), progress=False)
    assert "knn_top1" not in out and "100 %" in out["knn_note"]
    from synco.eval.knn_protocol import knn_datasets

    assert knn_datasets(cfg) is None  # so the k-NN monitor (knn_every) skips it too


def test_eval_root_without_dataset_means_folder(tmp_path, capsys, tiny_imagefolder):
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", "random", "backbone=cpu-demo", "--out", str(tmp_path),
                  f"root={tiny_imagefolder}", *KNN_OPTS)
    assert rc == 0, err
    result = json.loads((tmp_path / "knn.json").read_text())
    assert (result["dataset"], result["n_train"], result["n_test"]) == ("folder", 18, 9)


# ---------------------------------------------------------------------------------------------
# backbone= with a trained checkpoint (item 7)


def test_eval_backbone_other_than_the_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    _one_shot_run(run, seed=0)
    rc, err = cli(capsys, "eval", "knn", "device=cpu", "--checkpoint", str(run), "backbone=deit_small_patch16_224")
    assert_clean_error(rc, err, "deit_small_patch16_224", "vit_tiny_patch16_224")
    rc, err = cli(capsys, "eval", "knn", "device=cpu", "--checkpoint", str(run), "backbone_kwargs={depth: 3}")
    assert_clean_error(rc, err, "backbone_kwargs")
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", str(run), "backbone=vit_tiny_patch16_224", *KNN_OPTS)
    assert rc == 0, err  # the same backbone: harmless


# ---------------------------------------------------------------------------------------------
# bn_before_mlp export (item 8) and the timm route (item 9)


def test_bn_before_mlp_is_never_exported_for_timm(tmp_path, capsys, tiny_overrides):
    from synco.models.backbone import SYNCO_ONLY_EXPORT, create_backbone, export_safetensors, load_backbone

    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    model = create_backbone("vit_tiny_patch16_224", bn_before_mlp=True, **kw).eval()
    meta = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": kw, "bn_before_mlp": True}
    with pytest.raises(SyncoError, match="cannot be exported for timm"):
        export_safetensors(model, meta, tmp_path / "backbone.safetensors")
    rc, err = pretrain(capsys, tmp_path / "r", tiny_overrides, "model.bn_before_mlp=true", "epochs=1")
    assert rc == 0, err
    assert not (tmp_path / "r" / "backbone.safetensors").exists()
    assert "export_note" in json.loads((tmp_path / "r" / "summary.json").read_text())
    again, meta = load_backbone(str(tmp_path / "r" / SYNCO_ONLY_EXPORT))
    ref, _ = load_backbone(str(tmp_path / "r" / "checkpoint.pt"))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref(x))


def test_pyproject_timm_bound_is_one_the_readme_route_works_with():
    import re

    import timm

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    bound = re.search(r'"timm>=([0-9.]+)"', text).group(1)
    assert tuple(map(int, bound.split("."))) >= (1, 0, 31)  # 1.0.28-1.0.30 fail the route (issue 12)
    assert tuple(map(int, timm.__version__.split(".")[:3])) >= tuple(map(int, bound.split(".")))


@pytest.mark.parametrize("name, kw, size", [
    ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=3), 16),  # cpu-demo
    ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                                          window_size=7), 56),
])
def test_readme_timm_route(tmp_path, name, kw, size):
    import timm

    from synco.models.backbone import create_backbone, export_safetensors

    model = create_backbone(name, **kw).eval()
    path = tmp_path / "backbone.safetensors"
    export_safetensors(model, {"backbone": name, "backbone_kwargs": kw, "bn_before_mlp": False}, path)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0,
                               **kw).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------
# k-NN top-5 and the k=20 number


def test_knn_top5_counts_only_voted_classes():
    from synco.eval.knn import knn_classify

    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    train_y = torch.randint(0, 10, (200,), generator=g)
    test = torch.nn.functional.normalize(torch.randn(100, 16, generator=g), dim=1)
    test_y = torch.randint(0, 10, (100,), generator=g)
    res = knn_classify(train, train_y, test, test_y, ks=(1, 3, 200), num_classes=10)
    assert res[1]["top5"] == res[1]["top1"]  # one neighbour: one candidate class
    # k=3: a hit needs the label among the (at most 3) voted classes
    sims = test @ train.t()
    nn3 = train_y[sims.topk(3, dim=1).indices]
    expected = 100.0 * float((nn3 == test_y[:, None]).any(1).float().mean())
    assert res[3]["top5"] == pytest.approx(expected)


def test_knn_ties_go_to_the_lower_class_like_a_stable_sort():
    from synco.eval.knn import knn_classify

    train = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([3, 1])  # two neighbours at the same similarity, equal votes
    test = torch.tensor([[1.0, 0.0]])
    assert knn_classify(train, labels, test, torch.tensor([1]), ks=[2], num_classes=4)[2]["top1"] == 100.0
    assert knn_classify(train, labels, test, torch.tensor([3]), ks=[2], num_classes=4)[2]["top1"] == 0.0


def test_top1_at_is_k20_not_the_best():
    from synco.eval.knn import top1_at

    res = {10: {"top1": 90.0}, 20: {"top1": 50.0}, 200: {"top1": 70.0}}
    assert top1_at(res, 20) == 50.0
    assert top1_at({"10": {"top1": 1.0}, "100": {"top1": 2.0}}, 20) == 1.0  # the closest evaluated k


def test_read_jsonl_skips_a_line_torn_by_a_kill(tmp_path):
    from synco.engine.metrics import read_jsonl, training_summary

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "epoch": 0, "loss": 9.0, "pos_cos": 0.1}\n'
                   '{"step": 2, "epoch": 0, "loss": 7.0, "pos_cos": 0.3}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(log)] == [1, 2]
    assert training_summary(read_jsonl(log), 11.1) == {"initial_loss": 9.0, "final_loss": 7.0, "chance_loss": 11.1,
                                                       "pos_cos": 0.3}
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_logs_of_earlier_versions_are_read_under_todays_names(tmp_path):
    """Logs written before the cosines had one name (sim_pos in metrics.jsonl, pos_cos in summary.json) resume,
    plot and aggregate like new ones."""
    from synco.engine.metrics import read_jsonl, training_summary

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 9.0, "sim_pos": 0.1, "sim_hardest_neg": 0.2, "sim_synthetic": 0.3, '
                   '"sim_syn_interpolate": 0.4, "lr": 0.1}\n{"step": 2, "loss": 8.0, "pos_cos": 0.5}\n')
    assert read_jsonl(log) == [{"step": 1, "loss": 9.0, "pos_cos": 0.1, "hardest_neg_cos": 0.2, "synthetic_cos": 0.3,
                                "synthetic_cos_interpolate": 0.4, "lr": 0.1}, {"step": 2, "loss": 8.0, "pos_cos": 0.5}]
    assert training_summary(read_jsonl(log)[:1], None)["hardest_neg_cos"] == 0.2
