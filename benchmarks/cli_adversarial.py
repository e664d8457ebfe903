"""Re-run the adversarial CLI sweep of issue 12 and print the tally.

    python benchmarks/cli_adversarial.py [--only SUBSTRING] [--keep DIR] [--verbose]

Every case is a `synco` command line plus the outcome it must have:

* ``error``: exit 2, stderr ending in one ``synco: error: ...`` paragraph that names the problem (a needle),
  and no traceback;
* ``ok``: exit 0 and a check of the output (the numbers, the files, the summary) that proves it right;
* ``signal``: exit 128 + signal number with a message, the progress kept.

Outcomes are tallied as the issue did: clear errors, handled correctly, unclear errors (exit 2 without the
needle, or several paragraphs), raw tracebacks, silently wrong results (exit 0 where an error was due, or a
failed output check). Most cases run in this process (`synco.cli.main.main`, one import); the ones about
processes (locks, signals, kills) run `python -m synco` as a subprocess. Tiny configs only: the whole sweep
takes a few minutes on 2 CPU cores. Cases that need root (a read-only or full filesystem) use a tmpfs mount
when this process may mount one, else a simulated error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from synco.cli.main import main as synco  # noqa: E402

TINY = ["epochs=2", "optim.warmup_epochs=0", "negatives.warmup_epochs=0", "negatives.cooldown_epochs=0",
        "optim.batch_size=32", "contrast.queue_size=128", "negatives.n_hard=16", "negatives.counts=[4,4,4,4,4,4]",
        "model.proj_hidden=64", "model.pred_hidden=64", "model.proj_dim=32",
        "model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
        "data.max_images=128", "knn_at_end=false", "log_every=1", "threads=1", "data.num_workers=0"]
FOLDER = ["optim.batch_size=8", "contrast.queue_size=32", "negatives.n_hard=8", "epochs=1"]
KNN = ["--no-progress", "device=cpu", "num_workers=0", "k=[1,20]"]

CATEGORIES = ("clear errors", "handled correctly", "unclear errors", "raw tracebacks", "silently wrong")


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list] | list
    expect: str  # error | ok | signal
    needle: str = ""  # error: must appear in the last stderr line
    check: Optional[Callable[[Env, str], bool]] = None  # ok: proves the output right
    setup: Optional[Callable[[Env], None]] = None
    subprocess: bool = False
    run: Optional[Callable[[Env], tuple[int, str]]] = None  # a custom runner (processes, signals)


@dataclass
class Env:
    tmp: Path
    n: int = 0
    data: dict = field(default_factory=dict)

    def out(self) -> Path:
        self.n += 1
        return self.tmp / f"out{self.n}"


# ---------------------------------------------------------------------------------------------
# Data and runs the cases use


def make_env(tmp: Path) -> Env:
    from synco.data.digits import export_digits_imagefolder

    env = Env(tmp)
    digits = tmp / "digits"
    export_digits_imagefolder(digits / "train", "train", image_size=16, per_class=6)
    export_digits_imagefolder(digits / "val", "test", image_size=16, per_class=3)
    env.data["digits"] = digits
    bad = tmp / "bad"
    for cls in ("a", "b"):
        (bad / "train" / cls).mkdir(parents=True)
        for i in range(8):
            (bad / "train" / cls / f"{i}.png").write_bytes(b"not an image")
    env.data["bad"] = bad
    one = tmp / "one"
    for split in ("train", "val"):
        shutil.copytree(digits / split / "3", one / split / "3")
    env.data["one"] = one
    deep = tmp / "deep16"
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    for split in ("train", "val"):
        for cls in ("x", "y"):
            (deep / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.roll(ramp, 7 * i, axis=1) if cls == "x" else ramp[::-1]).save(
                    deep / split / cls / f"{i}.png")
    env.data["deep16"] = deep
    empty_cls = tmp / "emptycls"
    shutil.copytree(digits / "train", empty_cls / "train")
    (empty_cls / "train" / "zz").mkdir()
    env.data["emptycls"] = empty_cls
    noclass = tmp / "noclass"
    (noclass / "train").mkdir(parents=True)
    env.data["noclass"] = noclass
    (tmp / "afile").write_text("x")
    env.data["afile"] = tmp / "afile"
    # one tiny finished run every eval case can use
    run = tmp / "run"
    rc, err = call(["pretrain", "--no-progress", "--out", str(run), *TINY, "epochs=1"])
    assert rc == 0, err
    env.data["run"] = run
    return env


def call(argv: list) -> tuple[int, str]:
    """``synco ARGV`` in this process: (exit code, stderr); an escaping exception is a traceback."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = synco([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:  # noqa: BLE001 - this is what the sweep counts
            return -1, err.getvalue() + traceback.format_exc()
    return rc, err.getvalue()


def spawn(argv: list, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "synco", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def epoch_images(run: Path) -> list:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["real_images"] for r in records if r.get("epoch_end")]


def summary(path: Path) -> dict:
    return json.loads((Path(path) / "summary.json").read_text())


def result(path: Path, name: str = "knn") -> dict:
    return json.loads((Path(path) / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------------
# Custom runners (processes, signals, caches)


def run_concurrent(env: Env) -> tuple[int, str]:
    out = env.out()
    first = spawn(["pretrain", "--no-progress", "--out", out, *TINY, "epochs=400", "data.max_images=64"])
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.2)
        rc, err = call(["pretrain", "--no-progress", "--out", out, *TINY, "epochs=400", "data.max_images=64"])
        if rc == 2 and f"PID {first.pid}" not in err:
            err += "\n(the PID of the running process is not named)"
            rc = -2
        return rc, err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)


def run_stale_lock(env: Env) -> tuple[int, str]:
    out = env.out()
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".synco.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "start": "1"}))
    return call(["pretrain", "--no-progress", "--out", out, *TINY, "epochs=1"])


def run_signal(sig: int, workers: int = 1, group: bool = False):
    def runner(env: Env) -> tuple[int, str]:
        out = env.out()
        env.data["signal_out"] = out
        proc = spawn(["pretrain", "--no-progress", "--out", out, *TINY, "epochs=400", "data.max_images=64",
                      f"data.num_workers={workers}"], start_new_session=group)
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        if group:
            os.killpg(proc.pid, sig)  # as schedulers do: every process of the job, workers included
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=180)
        return proc.returncode, err
    return runner


def check_signal(env: Env, err: str) -> bool:
    from synco.io import load_torch_file as load

    out = env.data["signal_out"]
    if "stopped after step" in err:
        step = int(err.split("stopped after step ")[1].split()[0])
        return load(out / "checkpoint.pt")["step"] == step and not (out / ".synco.lock").exists()
    return "received: stopped" in err and (out / "checkpoint.pt").exists()


def run_sigkill_resume(env: Env) -> tuple[int, str]:
    out = env.out()
    argv = ["pretrain", "--no-progress", "--out", out, *TINY, "epochs=30", "data.max_images=64"]
    proc = spawn(argv)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.1)
    time.sleep(0.3)
    proc.kill()
    proc.communicate()
    env.data["sigkill_out"] = out
    return call(argv)


def run_stale_cache(env: Env) -> tuple[int, str]:
    """Evaluate a run mid-training, train it further (same path, even the same mtime), evaluate again."""
    out = env.out()
    argv = ["pretrain", "--no-progress", "--out", out, *TINY, "data.dataset=folder", f"data.root={env.data['digits']}",
            *FOLDER, "epochs=2"]
    from synco.config import load_config
    from synco.engine.train import Trainer, stop_at_step

    cfg = load_config("cpu-demo", argv[5:])
    Trainer(cfg, out, progress=False, step_hooks=(stop_at_step(3),)).train()
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    rc, err = call(["eval", "knn", "--checkpoint", out, "dataset=folder", f"root={env.data['digits']}", *KNN])
    if rc:
        return rc, err
    mid = result(out / "eval")["results"]
    mid_key = torch.load(out / "eval" / "knn_features.pt", weights_only=True)["key"]
    rc, err = call(argv)
    if rc:
        return rc, err
    os.utime(out / "checkpoint.pt", ns=(stamp, stamp))
    rc, err = call(["eval", "knn", "--checkpoint", out, "dataset=folder", f"root={env.data['digits']}", *KNN])
    if rc:
        return rc, err
    end = result(out / "eval")["results"]
    rc, err = call(["eval", "knn", "--checkpoint", out, "--out", env.tmp / "fresh", "cache=false", "dataset=folder",
                    f"root={env.data['digits']}", *KNN])
    fresh = result(env.tmp / "fresh")["results"]
    end_key = torch.load(out / "eval" / "knn_features.pt", weights_only=True)["key"]
    if end != fresh or end_key == mid_key:
        return -2, f"stale k-NN numbers: mid {mid}, after resume {end}, without cache {fresh}"
    return 0, err


def run_truncated_cache(env: Env) -> tuple[int, str]:
    out = env.out()
    argv = ["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN]
    rc, err = call(argv)
    if rc:
        return rc, err
    first = result(out)["results"]
    cache = out / "knn_features.pt"
    cache.write_bytes(cache.read_bytes()[:200])
    rc, err = call(argv)
    if rc == 0 and result(out)["results"] != first:
        return -2, "different numbers after rebuilding the cache"
    return rc, err


def run_rerun_throughput(env: Env) -> tuple[int, str]:
    out = env.out()
    argv = ["pretrain", "--no-progress", "--out", out, *TINY]
    rc, err = call(argv)
    if rc:
        return rc, err
    before = summary(out)
    rc, err = call(argv)
    after = summary(out)
    if rc == 0 and (after["images_per_second"] != before["images_per_second"]
                    or after["train_seconds"] != before["train_seconds"]):
        return -2, f"throughput rewritten: {before['images_per_second']} -> {after['images_per_second']}"
    return rc, err


def run_resume_throughput(env: Env) -> tuple[int, str]:
    from synco.config import load_config
    from synco.engine.train import Trainer, stop_at_step

    out = env.out()
    Trainer(load_config("cpu-demo", TINY), out, progress=False, step_hooks=(stop_at_step(5),)).train()
    rc, err = call(["pretrain", "--no-progress", "--out", out, *TINY])
    if rc == 0:
        s = summary(out)
        if s["train_images"] != 8 * 32 or len(s["train_segments"]) != 2:
            return -2, f"throughput covers {s['train_images']} images in {len(s['train_segments'])} segments"
    return rc, err


def run_disk_full(env: Env) -> tuple[int, str]:
    """A real full filesystem when a tmpfs can be mounted (root), else ENOSPC simulated in torch.save."""
    mnt = env.tmp / "tinyfs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            rc, err = call(["pretrain", "--no-progress", "--out", mnt / "run", *TINY, "epochs=1"])
        else:
            import errno

            from synco import io as sio

            real = sio.torch.save

            def full(obj, f, *a, **k):
                if hasattr(f, "fileno"):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(obj, f, *a, **k)

            sio.torch.save = full
            try:
                rc, err = call(["pretrain", "--no-progress", "--out", mnt / "run", *TINY, "epochs=1"])
            finally:
                sio.torch.save = real
        left = [p.name for p in (mnt / "run").iterdir() if ".tmp" in p.name or p.name == ".synco.lock"] \
            if (mnt / "run").exists() else []
        if left:
            return -2, f"left behind: {left}\n{err}"
        return rc, err
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def run_readonly(protocol: str):
    def runner(env: Env) -> tuple[int, str]:
        mnt = env.tmp / f"ro-{protocol}"
        mnt.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(mnt)],
                                 capture_output=True).returncode == 0
        if not mounted:
            os.chmod(mnt, 0o555)  # not root: a folder without write permission
        try:
            if protocol == "pretrain":
                return call(["pretrain", "--no-progress", "--out", mnt / "run", *TINY])
            return call(["eval", "knn", "--checkpoint", env.data["run"], "--out", mnt / "e", *KNN])
        finally:
            if mounted:
                subprocess.run(["umount", str(mnt)], capture_output=True)
    return runner


def run_leaked_tmp(env: Env) -> tuple[int, str]:
    out = env.out()
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leaked = out / f".checkpoint.pt.tmp{dead.pid}"
    leaked.write_bytes(b"x" * 1000)
    rc, err = call(["pretrain", "--no-progress", "--out", out, *TINY, "epochs=1"])
    if rc == 0 and leaked.exists():
        return -2, "the leaked temp file is still there"
    return rc, err


def run_bn_export(env: Env) -> tuple[int, str]:
    import timm

    out = env.out()
    rc, err = call(["pretrain", "--no-progress", "--out", out, *TINY, "model.bn_before_mlp=true", "epochs=1"])
    if rc:
        return rc, err
    if (out / "backbone.safetensors").exists():  # the README's timm route would load wrong weights
        kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
        timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, **kw,
                          pretrained_cfg_overlay=dict(file=str(out / "backbone.safetensors")))
        return -2, "backbone.safetensors of a bn_before_mlp run loads in timm without an error"
    return rc, err


def check_16bit(env: Env, err: str) -> bool:
    from synco.data.folder import SafeImageFolder

    img, _ = SafeImageFolder(env.data["deep16"] / "train")[0]
    return len(np.unique(np.asarray(img)[..., 0])) > 200


def check_timm_route(env: Env) -> tuple[int, str]:
    import timm

    from synco.models.backbone import create_backbone, export_safetensors

    for name, kw, size in (("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=96, depth=4,
                                                         num_heads=3), 16),
                           ("swin_tiny_patch4_window7_224", {}, 224)):
        model = create_backbone(name, **kw).eval()
        path = env.tmp / f"{name}.safetensors"
        export_safetensors(model, {"backbone": name, "backbone_kwargs": kw, "bn_before_mlp": False}, path)
        try:
            loaded = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)),
                                       **kw).eval()
        except Exception as e:  # noqa: BLE001
            return -1, f"timm {timm.__version__}: {name}: {e}"
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            if not torch.allclose(loaded(x), model(x), atol=1e-5):
                return -2, f"{name}: timm loads other weights"
    text = (ROOT / "pyproject.toml").read_text()
    bound = text.split('"timm>=')[1].split('"')[0]
    if tuple(map(int, bound.split("."))) < (1, 0, 31):
        return -2, f"pyproject allows timm>={bound}, whose README route fails (1.0.28-1.0.30)"
    return 0, ""


def run_corrupt_ckpt(kind: str):
    def runner(env: Env) -> tuple[int, str]:
        import argparse as ap

        run = env.out()
        run.mkdir()
        if kind == "object":
            torch.save({"config": {}, "model": {}, "x": ap.Namespace(a=1)}, run / "checkpoint.pt")
        elif kind == "truncated":
            data = (env.data["run"] / "checkpoint.pt").read_bytes()
            (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
        elif kind == "garbage":
            (run / "checkpoint.pt").write_bytes(b"garbage" * 10)
        elif kind == "not-synco":
            torch.save({"state_dict": {}}, run / "checkpoint.pt")
        rc, err = call(["eval", "knn", "--checkpoint", run, *KNN])
        if "weights_only" in err:
            return -3, err  # passes torch's unsafe advice on: unclear
        return rc, err
    return runner


def run_corrupt_resume(env: Env) -> tuple[int, str]:
    out = env.out()
    shutil.copytree(env.data["run"], out)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[:1000])
    rc, err = call(["pretrain", "--no-progress", "--out", out, *TINY, "epochs=2"])
    if "weights_only" in err:
        return -3, err
    return rc, err


def run_safetensors(kind: str):
    def runner(env: Env) -> tuple[int, str]:
        from safetensors.torch import save_file

        path = env.tmp / f"st-{kind}.safetensors"
        meta = {"nobackbone": {"synco": json.dumps({"backbone_kwargs": {}})}, "notjson": {"synco": "{oops"},
                "nometa": None, "garbage": None}[kind]
        if kind == "garbage":
            path.write_bytes(b"\x00" * 64)
        else:
            save_file({"w": torch.zeros(2)}, str(path), metadata=meta)
        return call(["eval", "knn", "--checkpoint", path, "--out", env.out(), *KNN])
    return runner


def run_plain_safetensors(env: Env) -> tuple[int, str]:
    """A timm backbone saved without synco metadata: backbone=/backbone_kwargs= give its architecture."""
    from safetensors.torch import save_file

    from synco.models.backbone import create_backbone

    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    model = create_backbone("vit_tiny_patch16_224", **kw)
    path = env.tmp / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return call(["eval", "knn", "--checkpoint", path, "--out", env.out(), "backbone=vit_tiny_patch16_224",
                 "backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", *KNN])


def run_knn_top5(env: Env) -> tuple[int, str]:
    """k-NN top-5 at k=1 must equal top-1 (only voted classes count)."""
    out = env.out()
    rc, err = call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN[:-1], "k=[1,3,20]"])
    if rc:
        return rc, err
    r = result(out)["results"]
    if r["1"]["top5"] != r["1"]["top1"] or r["3"]["top5"] < r["3"]["top1"]:
        return -2, f"top-5 counts classes without votes: {r}"
    return 0, err


# ---------------------------------------------------------------------------------------------
# Read back (issue 20): what comes back from disk, caches, data folders and the OS


def _readback_run(env: Env, seed: int = 0, poison: bool = False) -> Path:
    """A run folder holding only checkpoint.pt, with backbone weights drawn from ``seed`` (NaN with ``poison``)."""
    from synco.config import load_config
    from synco.models.backbone import backbone_from_config

    cfg = load_config("cpu-demo", TINY)
    torch.manual_seed(seed)
    state = backbone_from_config(cfg.model).state_dict()
    if poison:
        state["cls_token"] = torch.full_like(state["cls_token"], float("nan"))
    run = env.tmp / f"rb-run-{seed}-{int(poison)}"
    run.mkdir(exist_ok=True)
    torch.save({"config": cfg.to_dict(), "model": {f"online.backbone.{k}": v for k, v in state.items()}, "epoch": 1},
               run / "checkpoint.pt")
    return run


def _readback_head(env: Env, **change) -> Path:
    from synco.eval.head import LinearHead, save_head

    path = env.out() / "linear_head.pt"
    path.parent.mkdir(parents=True)
    save_head(LinearHead(32, 10), path, [str(d) for d in range(10)], {"backbone": "vit_tiny_patch16_224"}, 16)
    if change:
        torch.save({**torch.load(path, weights_only=True), **change}, path)
    return path


def run_knn_small_temperature(env: Env) -> tuple[int, str]:
    """k-NN at T=0.01 against a float64 log-sum-exp vote on the cached features."""
    out = env.out()
    rc, err = call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN, "temperature=0.01"])
    if rc:
        return rc, err
    f = torch.load(out / "knn_features.pt", weights_only=True)
    s, i = (f["test"].double() @ f["train"].double().t()).topk(20, dim=1)
    labels, n = f["train_labels"][i], int(f["train_labels"].max()) + 1
    votes = torch.stack([torch.where(labels == c, s / 0.01, -torch.inf).logsumexp(1) for c in range(n)], 1)
    top1 = 100.0 * float((votes.argmax(1) == f["test_labels"]).double().mean())
    if abs(result(out)["results"]["20"]["top1"] - top1) > 1e-6:
        return -2, f"k-NN at T=0.01 reports {result(out)['results']['20']['top1']}, a stable vote {top1}"
    return rc, err


def run_nan_head(env: Env) -> tuple[int, str]:
    return _robustness_keeps_earlier(env, _readback_head(env, bias=torch.full((10,), float("nan"))), [])


def _robustness_keeps_earlier(env: Env, head: str, extra: list) -> tuple[int, str]:
    """``eval robustness`` with ``head`` into an --out holding an earlier result, which must survive a refusal."""
    out = env.out()
    out.mkdir()
    (out / "robustness.json").write_text('{"kept": true}')
    rc, err = call(["eval", "robustness", "--checkpoint", env.data["run"], "--linear-head", head, "--out", out,
                    *KNN[:3], *extra])
    if json.loads((out / "robustness.json").read_text()) != {"kept": True}:
        return -2, "the earlier robustness.json was overwritten\n" + err
    return rc, err


def run_renamed_val_class(env: Env) -> tuple[int, str]:
    root = env.tmp / "rb-renamed"
    shutil.copytree(env.data["digits"], root)
    (root / "val" / "0").rename(root / "val" / "z")
    return call(["eval", "knn", "--checkpoint", env.data["run"], "--out", env.out(), "dataset=folder",
                 f"root={root}", *KNN])


def run_cache_contents(env: Env) -> tuple[int, str]:
    """Overwrite val images under the same names: the same --out must give the numbers of the new images."""
    root = env.tmp / "rb-overwritten"
    shutil.copytree(env.data["digits"], root)
    out, fresh = env.out(), env.out()
    argv = ["eval", "knn", "--checkpoint", env.data["run"], "dataset=folder", f"root={root}", *KNN]
    rc, err = call([*argv, "--out", out])
    if rc:
        return rc, err
    for i, f in enumerate(sorted((root / "val" / "1").iterdir())):
        f.write_bytes(sorted((root / "val" / "7").iterdir())[i].read_bytes())
        os.utime(f, ns=(10**18 + i, 10**18 + i))
    rc, err = call([*argv, "--out", out])
    rc2, err2 = call([*argv, "--out", fresh, "cache=false"])
    if rc or rc2:
        return rc or rc2, err + err2
    if result(out)["results"] != result(fresh)["results"]:
        return -2, f"stale cache: {result(out)['results']} vs {result(fresh)['results']}"
    return 0, err


def run_linear_stale(env: Env) -> tuple[int, str]:
    """A probe, then the run trains further (same path, new weights): the same --out must give the new number."""
    run, out, fresh = _readback_run(env, 1), env.out(), env.out()
    argv = ["eval", "linear", "--checkpoint", run, "epochs=1", "warmup_epochs=0", "val_fraction=0",
            "cache_features=true", "dataset=folder", f"root={env.data['digits']}", *KNN[:3]]
    rc, err = call([*argv, "--out", out])
    if rc:
        return rc, err
    shutil.copy(_readback_run(env, 2) / "checkpoint.pt", run / "checkpoint.pt")
    rc, err = call([*argv, "--out", out])
    rc2, err2 = call([*argv, "--out", fresh])
    if rc or rc2:
        return rc or rc2, err + err2
    if result(out, "linear")["history"] != result(fresh, "linear")["history"]:
        return -2, "the probe returned the numbers of the old weights"
    return 0, err


def run_locked_eval(env: Env) -> tuple[int, str]:
    out = env.out()
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".synco.lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        return call(["eval", "linear", "--checkpoint", env.data["run"], "--out", out, "epochs=1",
                     "warmup_epochs=0", *KNN[:3]])
    finally:
        holder.kill()
        holder.wait()


def _result_file(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def run_report_two_run1(env: Env) -> tuple[int, str]:
    """Two folders whose runs are both run1 (synco and byol), evaluated from inside their parents."""
    import yaml

    base = env.out()
    for folder, method in (("A", "synco"), ("B", "byol")):
        (base / folder / "run1").mkdir(parents=True)
        (base / folder / "run1" / "config.yaml").write_text(yaml.safe_dump({"method": method}))
        _result_file(base / folder / "run1" / "eval" / "knn.json",
                     {"protocol": "knn", "checkpoint": "run1", "backbone": "vit", "dataset": "digits",
                      "results": {"20": {"top1": 60.0 if method == "synco" else 50.0, "top5": 90.0}}})
    cwd = os.getcwd()
    os.chdir(base / "A")
    try:
        rc, err = call(["report", ".", "../B", "--out", base / "rep"])
    finally:
        os.chdir(cwd)
    if rc:
        return rc, err
    rows = (base / "rep" / "report.csv").read_text().splitlines()[1:]
    if sorted(r.split(",")[0] for r in rows) != ["byol", "synco"]:
        return -2, f"rows: {rows}"
    return 0, err


def run_report_string(env: Env) -> tuple[int, str]:
    out = env.out()
    _result_file(out / "eval" / "knn.json", {"protocol": "knn", "checkpoint": "random", "backbone": "vit",
                                             "results": {"20": {"top1": "77.5", "top5": 90.0}}})
    return call(["report", out, "--out", out / "rep"])


def _sweep_spec(env: Env) -> Path:
    import yaml

    spec = env.tmp / "rb-spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "rb", "base": "cpu-demo", "seeds": 1, "overrides": TINY,
                                    "axes": {"grid": {"contrast.temperature": [0.2]}}}))
    return spec


def _planned_run(env: Env, out: Path, root: Path):
    from synco.sweep import runner
    from synco.sweep.spec import load_spec

    (run,) = runner.plan(load_spec(str(_sweep_spec(env))), out, [f"data.root={root}", "data.dataset=folder"])
    run.dir.mkdir(parents=True)
    (run.dir / "config.yaml").write_text(__import__("yaml").safe_dump(run.cfg.to_dict()))
    return run


def run_sweep_other_root(env: Env) -> tuple[int, str]:
    out = env.out()
    _planned_run(env, out, env.data["digits"])
    (list(out.rglob("config.yaml"))[0].parent / "summary.json").write_text('{"knn_top1": 50.0}')
    other = env.tmp / "rb-digits2"
    if not other.exists():
        shutil.copytree(env.data["digits"], other)
    return call(["sweep", _sweep_spec(env), "--out", out, "--dry-run", f"data.root={other}", "data.dataset=folder"])


def run_sweep_torn_summary(env: Env) -> tuple[int, str]:
    from synco.sweep import runner
    from synco.sweep.spec import load_spec

    out = env.out()
    run = _planned_run(env, out, env.data["digits"])
    (run.dir / "summary.json").write_text('{"knn_top1": 5')
    (again,) = runner.plan(load_spec(str(_sweep_spec(env))), out, [f"data.root={env.data['digits']}",
                                                                    "data.dataset=folder"])
    return (0, "") if again.status == "resume" else (-2, f"a torn summary.json counts as {again.status}")


def _diffusion(env: Env) -> Path:
    """A diffusion model trained for two steps (seconds), made once."""
    from synco.synth.diffusion import DiffusionTrainConfig, train_diffusion

    model = env.tmp / "rb-diffusion"
    if not model.exists():
        train_diffusion("digits", model, DiffusionTrainConfig(
            block_out_channels=[8, 16], attention=[False, True], norm_num_groups=4, batch_size=8, sample_steps=2,
            preview=False, threads=1, log_every=1, warmup_steps=1, device="cpu", steps=2), progress=False)
    return model


def run_generate_damaged(what: str):
    def runner(env: Env) -> tuple[int, str]:
        out = env.out()
        gen = ["synth-data", "generate", "--model", _diffusion(env), "--classes", "0,1", "--out", out,
               "--no-progress", "device=cpu"]
        rc, err = call([*gen, "--per-class", "1"])
        if rc:
            return rc, err
        if what == "settings":
            (out / "generation.json").write_text((out / "generation.json").read_text()[:15])
            return call([*gen, "--per-class", "2", "steps=7"])
        lines = (out / "manifest.jsonl").read_text().splitlines()
        (out / "manifest.jsonl").write_text(json.dumps([json.loads(line) for line in lines]) + "\n")
        return call([*gen, "--per-class", "2"])
    return runner


def run_torn_metrics(env: Env) -> tuple[int, str]:
    out = env.out()
    shutil.copytree(env.data["run"], out)
    (out / "summary.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"step": "x"}\nnot json\n{"step": 999, "lo')
    rc, err = call(["pretrain", "--no-progress", "--out", out, *TINY, "epochs=1"])
    if rc == 0 and len(epoch_images(out)) != 1:
        return -2, f"metrics.jsonl holds {len(epoch_images(out))} epoch ends after the resume"
    return rc, err


def run_string_step(env: Env) -> tuple[int, str]:
    out = env.out()
    shutil.copytree(env.data["run"], out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["step"] = str(state["step"])
    torch.save(state, out / "checkpoint.pt")
    return call(["pretrain", "--no-progress", "--out", out, *TINY, "epochs=1"])


def _voc(env: Env) -> Path:
    root = env.out()
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for split in ("trainval", "test"):
        ids = [f"{split[:2]}{i}" for i in range(4)]
        for i, ident in enumerate(ids):
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(voc / "JPEGImages" / f"{ident}.jpg")
            (voc / "Annotations" / f"{ident}.xml").write_text(
                f"<annotation><object><name>{['dog', 'cat'][i % 2]}</name></object></annotation>")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def run_transfer_voc(kind: str):
    def runner(env: Env) -> tuple[int, str]:
        root = _voc(env)
        voc = root / "VOCdevkit" / "VOC2007"
        if kind == "truncated xml":
            (voc / "Annotations" / "tr1.xml").write_text("<annotation><object><name>cat</na")
        elif kind == "object without name":
            (voc / "Annotations" / "tr1.xml").write_text("<annotation><object><pose>x</pose></object></annotation>")
        elif kind == "corrupt image":
            (voc / "JPEGImages" / "tr1.jpg").write_bytes(b"garbage")
            (voc / "JPEGImages" / "te2.jpg").unlink()
        return call(["eval", "transfer", "--checkpoint", env.data["run"], "--out", env.out(), "--datasets", "voc2007",
                     f"root={root}", "linear.epochs=1", "linear.warmup_epochs=0", "batch_size=4", *KNN[:3]])
    return runner


def run_transfer_cars(env: Env) -> tuple[int, str]:
    root = env.out()
    cars = root / "stanford_cars"
    for sub in ("devkit", "cars_train", "cars_test"):
        (cars / sub).mkdir(parents=True)
    for name in ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat"):
        (cars / name).write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    return call(["eval", "transfer", "--checkpoint", env.data["run"], "--out", env.out(), "--datasets", "cars",
                 f"root={root}", "linear.epochs=1", "linear.warmup_epochs=0", *KNN[:3]])


def run_sun397_order(env: Env) -> tuple[int, str]:
    """The SUN397 fallback split of the same files listed in two orders must be the same split."""
    import torchvision.datasets as tvd

    from synco.eval.transfer import TransferOptions
    from synco.eval.transfer_data import sun397_split

    root = env.out()
    (root / "SUN397").mkdir(parents=True)
    (root / "SUN397" / "ClassName.txt").write_text("/a/abbey\n/b/bar\n")
    for cls in ("a/abbey", "b/bar"):
        (root / "SUN397" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8)).save(root / "SUN397" / cls / f"sun_{cls[-1]}{i}.jpg")
    splits = []
    for reverse in (False, True):
        ds = tvd.SUN397(str(root), download=False)
        order = sorted(range(len(ds._image_files)), key=lambda i: str(ds._image_files[i]), reverse=reverse)
        ds._image_files, ds._labels = [ds._image_files[i] for i in order], [ds._labels[i] for i in order]
        train, _ = sun397_split(ds, root, TransferOptions(sun397_train_per_class=2))
        splits.append(sorted(str(b._image_files[j]) for b, j in train.items))
    return (0, "") if splits[0] == splits[1] else (-2, f"listing order changes the split: {splits}")


def run_v2_imagenet100(env: Env) -> tuple[int, str]:
    from timm.data import ImageNetInfo

    from synco.data.folder import load_class_list
    from synco.eval.classes import class_index_map

    head, wnids = load_class_list("imagenet100"), list(ImageNetInfo("imagenet-1k").label_names())
    mapping = class_index_map([str(i) for i in range(1000)], head)
    if len(mapping) != 100 or any(head[h] != wnids[int(f)] for f, h in mapping.items()):
        return -2, f"ImageNet-v2 folders map to {len(mapping)} of the 100 head classes"
    return 0, ""


def run_symlink_loop_folder(env: Env) -> tuple[int, str]:
    root = env.tmp / "rb-loop"
    if not root.exists():
        shutil.copytree(env.data["digits"], root)
        (root / "train" / "3" / "up").symlink_to("..")
        (root / "val" / "5" / "self").symlink_to(".")
    out = env.out()
    rc, err = call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, "dataset=folder", f"root={root}",
                    *KNN])
    if rc == 0 and (result(out)["n_train"], result(out)["n_test"]) != (60, 30):
        return -2, f"a symlink loop listed {result(out)['n_train']} + {result(out)['n_test']} images, not 60 + 30"
    return rc, err


def run_pickled_head(env: Env) -> tuple[int, str]:
    import argparse as ap

    head = env.out() / "linear_head.pt"
    head.parent.mkdir()
    torch.save({"weight": torch.zeros(10, 32), "bias": torch.zeros(10), "x": ap.Namespace(a=1)}, head)
    rc, err = call(["eval", "robustness", "--checkpoint", env.data["run"], "--linear-head", head, "--out", env.out(),
                    *KNN[:3]])
    return (-3, err) if "weights_only" in err else (rc, err)


def run_robustness_asked(extra: list):
    def runner(env: Env) -> tuple[int, str]:
        return _robustness_keeps_earlier(env, _readback_head(env), [a.format(tmp=env.tmp) for a in extra])
    return runner


def run_long_name(where: str):
    def runner(env: Env) -> tuple[int, str]:
        long = env.tmp / ("a" * 300)
        if where == "checkpoint":
            return call(["eval", "knn", "--checkpoint", long, *KNN])
        return call(["eval", "knn", "--checkpoint", env.data["run"], "--out", long, *KNN])
    return runner


def run_out_loop(command: str):
    def runner(env: Env) -> tuple[int, str]:
        loop = env.tmp / "rb-symlink-loop"
        if not loop.is_symlink():
            loop.symlink_to(loop.name)
        if command == "sweep":
            return call(["sweep", _sweep_spec(env), "--out", loop / "x", "--dry-run"])
        return call(["eval", "knn", "--checkpoint", env.data["run"], "--out", loop / "x", *KNN])
    return runner


def _bare_safetensors(env: Env) -> Path:
    from safetensors.torch import save_file

    path = env.tmp / "rb-bare.safetensors"
    state = torch.load(_readback_run(env) / "checkpoint.pt", weights_only=True)["model"]
    save_file({k[len("online.backbone."):]: v.contiguous() for k, v in state.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# The cases


def cases() -> list[Case]:
    c: list[Case] = []

    def P(*extra):  # pretrain argv factory
        return lambda env: ["pretrain", "--no-progress", "--out", env.out(), *TINY, *extra]

    def E(protocol, *extra, checkpoint=None):
        return lambda env: ["eval", protocol, "--checkpoint", checkpoint or env.data["run"], "--out", env.out(),
                            "--no-progress", *extra]

    # --- config: types, names, presets
    errors = [
        ("unknown key", ["optim.lrr=1"], "optim.lrr"), ("unknown section", ["foo.bar=1"], "foo.bar"),
        ("wrong type int", ["epochs=abc"], "epochs"), ("wrong type bool", ["resume=maybe"], "resume"),
        ("wrong type list", ["optim.betas=0.9"], "optim.betas"), ("section as scalar", ["optim=3"], "optim"),
        ("override without =", ["epochs"], "key=value"), ("method unknown", ["method=simclr"], "method"),
        ("epochs 0", ["epochs=0"], "epochs"), ("epochs negative", ["epochs=-3"], "epochs"),
        ("device unknown", ["device=tpu"], "device"), ("precision unknown", ["precision=fp8"], "precision"),
        ("base_lr nan", ["optim.base_lr=nan"], "optim.base_lr"), ("base_lr inf", ["optim.base_lr=.inf"], "optim.base_lr"),
        ("base_lr 0", ["optim.base_lr=0"], "optim.base_lr"), ("base_lr negative", ["optim.base_lr=-1"], "optim.base_lr"),
        ("weight_decay nan", ["optim.weight_decay=nan"], "optim.weight_decay"),
        ("weight_decay negative", ["optim.weight_decay=-1"], "optim.weight_decay"),
        ("min_lr nan", ["optim.min_lr=nan"], "optim.min_lr"), ("clip_grad 0", ["optim.clip_grad=0"], "optim.clip_grad"),
        ("clip_grad nan", ["optim.clip_grad=nan"], "optim.clip_grad"),
        ("betas [2,3]", ["optim.betas=[2,3]"], "optim.betas"), ("betas one", ["optim.betas=[0.9]"], "optim.betas"),
        ("betas 1.0", ["optim.betas=[0.9,1.0]"], "optim.betas"),
        ("batch_size 0", ["optim.batch_size=0"], "optim.batch_size"),
        ("batch_size 1 (BatchNorm)", ["optim.batch_size=1", "contrast.queue_size=16", "negatives.n_hard=4"],
         "optim.batch_size"),
        ("accum_steps 0", ["optim.accum_steps=0"], "optim.accum_steps"),
        ("warmup negative", ["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
        ("warmup nan", ["optim.warmup_epochs=nan"], "optim.warmup_epochs"),
        ("temperature nan", ["contrast.temperature=nan"], "contrast.temperature"),
        ("temperature 0", ["contrast.temperature=0"], "contrast.temperature"),
        ("temperature inf", ["contrast.temperature=.inf"], "contrast.temperature"),
        ("queue 0", ["contrast.queue_size=0"], "contrast.queue_size"),
        ("queue not multiple of batch", ["contrast.queue_size=100"], "multiple of the global batch"),
        ("momentum 1.5", ["contrast.momentum_start=1.5"], "contrast.momentum_start"),
        ("momentum nan", ["contrast.momentum_start=nan"], "contrast.momentum_start"),
        ("n_hard > queue", ["negatives.n_hard=1000"], "negatives.n_hard"),
        ("counts wrong length", ["negatives.counts=[1,2]"], "counts"),
        ("alpha_max nan", ["negatives.alpha_max=nan"], "negatives.alpha_max"),
        ("sigma inf", ["negatives.sigma=.inf"], "negatives.sigma"),
        ("synthetic warmup negative", ["negatives.warmup_epochs=-1"], "negatives.warmup_epochs"),
        ("drop_path 1.5", ["model.drop_path_online=1.5"], "model.drop_path_online"),
        ("drop_path nan", ["model.drop_path_online=nan"], "model.drop_path_online"),
        ("proj_dim 0", ["model.proj_dim=0"], "model.proj_dim"),
        ("backbone unknown", ["model.backbone=not_a_model"], "not_a_model"),
        ("backbone kwargs: heads do not divide dim",
         ["model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 30, depth: 1, num_heads: 4}"], "backbone"),
        ("backbone kwargs: patch larger than image",
         ["model.backbone_kwargs={img_size: 16, patch_size: 32, embed_dim: 32, depth: 1, num_heads: 2}"], "patch"),
        ("backbone kwargs: unknown argument", ["model.backbone_kwargs={img_size: 16, nope: 1}"], "nope"),
        ("image_size vs backbone", ["data.image_size=32"], "data.image_size"),
        ("image_size 4", ["data.image_size=4"], "data.image_size"),
        ("imagenet100 without root", ["data.dataset=imagenet100"], "data.root"),
        ("folder root missing", ["data.dataset=folder", "data.root=/nonexistent/x"], "/nonexistent/x"),
        ("class_list missing", ["data.dataset=folder", "data.root=/tmp", "data.class_list=/nonexistent.txt"],
         "nonexistent.txt"),
        ("synthetic ratio without root", ["data.synthetic_ratio=0.5"], "data.synthetic_root"),
        ("synthetic ratio 2", ["data.synthetic_ratio=2"], "data.synthetic_ratio"),
        ("synthetic root missing", ["data.synthetic_ratio=0.5", "data.synthetic_root=/nonexistent/s"], "/nonexistent/s"),
        ("max_images 0", ["data.max_images=0"], "data.max_images"),
        ("num_workers negative", ["data.num_workers=-1"], "data.num_workers"),
        ("crop_scale reversed", ["data.augment.crop_scale=[0.9,0.1]"], "crop_scale"),
        ("crop_ratio inf", ["data.augment.crop_ratio=[0.75,.inf]"], "crop_ratio"),
        ("log_every 0", ["log_every=0"], "log_every"), ("ckpt_every_steps negative", ["ckpt_every_steps=-1"],
                                                         "ckpt_every_steps"),
        ("seed huge", ["seed=99999999999999999999"], "seed"), ("seed negative", ["seed=-1"], "seed"),
        ("knn.k [0]", ["knn.k=[0]"], "knn.k"), ("knn.k empty", ["knn.k=[]"], "knn.k"),
        ("knn temperature nan", ["knn.temperature=nan"], "knn.temperature"),
        ("batch larger than data", ["optim.batch_size=256", "contrast.queue_size=256"], "fewer than one optimizer step"),
        ("cuda without GPU", ["device=cuda"], "device") if not torch.cuda.is_available() else None,
    ]
    for item in errors:
        if item:
            name, extra, needle = item
            c.append(Case(f"config: {name}", P(*extra), "error", needle))
    c.append(Case("config: unknown preset", lambda env: ["pretrain", "--config", "nope", "--out", env.out()],
                  "error", "unknown preset"))
    c.append(Case("config: missing YAML file", lambda env: ["pretrain", "--config", "/nonexistent.yaml",
                                                            "--out", env.out()], "error", "does not exist"))

    def bad_yaml(env):
        (env.tmp / "bad.yaml").write_text("epochs: [1, 2\n")
        return ["pretrain", "--config", env.tmp / "bad.yaml", "--out", env.out()]
    c.append(Case("config: invalid YAML", bad_yaml, "error", "not valid YAML"))

    # --- config values that must work (with a note) rather than fail
    c.append(Case("config: epochs=1 with the cpu-demo warm-up (3)", P("epochs=1", "optim.warmup_epochs=3"), "ok",
                  check=lambda env, err: True))
    c.append(Case("config: data.root without data.dataset trains on the folder",
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *TINY, *FOLDER,
                               f"data.root={env.data['digits']}"], "ok",
                  check=lambda env, err: "folder" in (env.tmp / f"out{env.n}" / "config.yaml").read_text()
                  and epoch_images(env.tmp / f"out{env.n}") == [60]))  # the folder's 60 images, not 1437 digits
    c.append(Case("config: image_size follows a backbone without img_size",
                  P("model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                    "data.image_size=32", "epochs=1"), "ok",
                  check=lambda env, err: "img_size: 32" in (env.tmp / f"out{env.n}" / "config.yaml").read_text()))
    c.append(Case("config: method moby / byol run", P("method=byol", "epochs=1"), "ok", check=lambda env, err: True))

    # --- resume
    c.append(Case("resume: other backbone", lambda env: ["pretrain", "--out", env.data["run"], *TINY, "epochs=1",
                                                         "model.backbone=vit_small_patch16_224"], "error",
                  "vit_small_patch16_224"))
    c.append(Case("resume: other temperature", lambda env: ["pretrain", "--out", env.data["run"], *TINY, "epochs=1",
                                                            "contrast.temperature=0.1"], "error",
                  "contrast.temperature"))
    c.append(Case("resume: resume=false on a run", lambda env: ["pretrain", "--out", env.data["run"], *TINY,
                                                               "epochs=1", "resume=false"], "error",
                  "already holds a checkpoint"))
    c.append(Case("resume: corrupt checkpoint", [], "error", "cannot read", run=run_corrupt_resume))
    c.append(Case("resume: after SIGKILL", [], "ok", run=run_sigkill_resume, subprocess=True,
                  check=lambda env, err: __import__("synco.io", fromlist=["load_torch_file"]).load_torch_file(
                      env.data["sigkill_out"] / "checkpoint.pt")["step"] == 60))
    c.append(Case("resume: re-run keeps the throughput (item 3)", [], "ok", run=run_rerun_throughput,
                  check=lambda env, err: True))
    c.append(Case("resume: throughput over segments (item 3)", [], "ok", run=run_resume_throughput,
                  check=lambda env, err: True))

    # --- output locations
    c.append(Case("out: existing file (pretrain)", lambda env: ["pretrain", "--out", env.data["afile"], *TINY],
                  "error", "existing file"))
    c.append(Case("out: under a file (pretrain)", lambda env: ["pretrain", "--out", env.data["afile"] / "x", *TINY],
                  "error", "is a file"))
    c.append(Case("out: /proc (pretrain)", ["pretrain", "--out", "/proc/synco-run", *TINY], "error", "/proc"))
    c.append(Case("out: /sys (pretrain)", ["pretrain", "--out", "/sys/synco-run", *TINY], "error", "/sys"))
    c.append(Case("out: read-only (pretrain)", [], "error", "--out", run=run_readonly("pretrain")))
    c.append(Case("out: existing file (eval)", lambda env: ["eval", "knn", "--checkpoint", env.data["run"], "--out",
                                                            env.data["afile"], *KNN], "error", "existing file"))
    c.append(Case("out: /proc (eval)", lambda env: ["eval", "knn", "--checkpoint", env.data["run"], "--out",
                                                    "/proc/synco-eval", *KNN], "error", "/proc"))
    c.append(Case("out: /sys (eval)", lambda env: ["eval", "linear", "--checkpoint", env.data["run"], "--out",
                                                   "/sys/synco-eval", "epochs=1"], "error", "/sys"))
    c.append(Case("out: read-only (eval)", [], "error", "--out", run=run_readonly("eval")))
    c.append(Case("out: disk full during a checkpoint write", [], "error", "disk full", run=run_disk_full))
    c.append(Case("out: leaked temp file from a killed write", [], "ok", run=run_leaked_tmp,
                  check=lambda env, err: True))
    c.append(Case("out: two runs on one --out (item 2)", [], "error", "in use", run=run_concurrent, subprocess=True))
    c.append(Case("out: stale lock of a dead process", [], "ok", run=run_stale_lock, check=lambda env, err: True))

    # --- data
    c.append(Case("data: one corrupt image among good ones",
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *TINY, *FOLDER, "data.dataset=folder",
                               f"data.root={corrupt_one(env)}"], "ok",
                  check=lambda env, err: summary(env.tmp / f"out{env.n}")["bad_images"] == 1))
    c.append(Case("data: every image corrupt (workers)",
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *TINY, *FOLDER, "data.dataset=folder",
                               f"data.root={env.data['bad']}", "data.num_workers=1"], "error", "could not be read"))
    c.append(Case("data: every image corrupt (no workers)",
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *TINY, *FOLDER, "data.dataset=folder",
                               f"data.root={env.data['bad']}"], "error", "could not be read"))
    c.append(Case("data: empty class folder", lambda env: ["pretrain", "--out", env.out(), *TINY, *FOLDER,
                                                           "data.dataset=folder", f"data.root={env.data['emptycls']}"],
                  "error", "contain no images"))
    c.append(Case("data: no class folders", lambda env: ["pretrain", "--out", env.out(), *TINY, *FOLDER,
                                                         "data.dataset=folder", f"data.root={env.data['noclass']}"],
                  "error", "no class sub-folders"))
    c.append(Case("data: root is a file", lambda env: ["pretrain", "--out", env.out(), *TINY, "data.dataset=folder",
                                                       f"data.root={env.data['afile']}"], "error", "afile"))
    c.append(Case("data: 16-bit PNGs (item 5)", lambda env: ["pretrain", "--no-progress", "--out", env.out(), *TINY,
                                                             "optim.batch_size=4", "contrast.queue_size=16",
                                                             "negatives.n_hard=4", "epochs=1", "data.dataset=folder",
                                                             f"data.root={env.data['deep16']}"], "ok",
                  check=check_16bit))
    c.append(Case("data: one-class folder pretrain skips k-NN with a note",
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *TINY, "optim.batch_size=2",
                               "contrast.queue_size=8", "negatives.n_hard=4", "epochs=1", "knn_at_end=true",
                               "data.dataset=folder", f"data.root={env.data['one']}"], "ok",
                  check=lambda env, err: "knn_top1" not in summary(env.tmp / f"out{env.n}")))

    # --- eval
    c.append(Case("eval: knn on a run dir", E("knn", *KNN[1:]), "ok",
                  check=lambda env, err: 0 <= result(env.tmp / f"out{env.n}")["results"]["20"]["top1"] <= 100))
    c.append(Case("eval: knn on checkpoint.pt", lambda env: ["eval", "knn", "--checkpoint",
                                                             env.data["run"] / "checkpoint.pt", "--out", env.out(),
                                                             *KNN], "ok", check=lambda env, err: True))
    c.append(Case("eval: knn on backbone.safetensors", lambda env: ["eval", "knn", "--checkpoint",
                                                                    env.data["run"] / "backbone.safetensors", "--out",
                                                                    env.out(), *KNN], "ok",
                  check=lambda env, err: True))
    c.append(Case("eval: random with a preset backbone", E("knn", *KNN[1:], "backbone=cpu-demo", checkpoint="random"),
                  "ok", check=lambda env, err: True))
    c.append(Case("eval: random without backbone", E("knn", *KNN[1:], checkpoint="random"), "error", "backbone"))
    c.append(Case("eval: checkpoint missing", E("knn", checkpoint="/nonexistent/run"), "error", "does not exist"))
    c.append(Case("eval: dir without checkpoint", lambda env: ["eval", "knn", "--checkpoint", env.tmp / "digits",
                                                               "--out", env.out()], "error", "neither"))
    c.append(Case("eval: backbone=OTHER with a run (item 7)", E("knn", "backbone=deit_small_patch16_224"), "error",
                  "deit_small_patch16_224"))
    c.append(Case("eval: backbone_kwargs with a run", E("knn", "backbone_kwargs={depth: 3}"), "error",
                  "backbone_kwargs"))
    c.append(Case("eval: k=[0] (item 6)", E("knn", "k=[0]"), "error", "option 'k'"))
    c.append(Case("eval: temperature=0", E("knn", "temperature=0"), "error", "temperature"))
    c.append(Case("eval: knn one class (item 6)", lambda env: E("knn", "dataset=folder", f"root={env.data['one']}")(env),
                  "error", "1 class"))
    c.append(Case("eval: linear one class (item 6)",
                  lambda env: E("linear", "dataset=folder", f"root={env.data['one']}", "epochs=1")(env), "error",
                  "1 class"))
    c.append(Case("eval: finetune one class",
                  lambda env: E("finetune", "dataset=folder", f"root={env.data['one']}", "epochs=1")(env), "error",
                  "1 class"))
    c.append(Case("eval: root without dataset (item 4, eval side)",
                  lambda env: E("knn", *KNN[1:], f"root={env.data['digits']}")(env), "ok",
                  check=lambda env, err: result(env.tmp / f"out{env.n}")["n_train"] == 60))
    c.append(Case("eval: unknown dataset", E("knn", "dataset=nope"), "error", "nope"))
    c.append(Case("eval: unknown option", E("knn", "nope=1"), "error", "nope"))
    c.append(Case("eval: folder without val/", lambda env: E("knn", "dataset=folder",
                                                             f"root={env.data['digits'] / 'train'}")(env), "error",
                  "val"))
    c.append(Case("eval: stale k-NN cache after a resume (item 1)", [], "ok", run=run_stale_cache,
                  check=lambda env, err: True))
    c.append(Case("eval: truncated feature cache", [], "ok", run=run_truncated_cache, check=lambda env, err: True))
    c.append(Case("eval: top-5 only counts voted classes", [], "ok", run=run_knn_top5, check=lambda env, err: True))
    for kind in ("object", "truncated", "garbage", "not-synco"):
        c.append(Case(f"eval: corrupt checkpoint ({kind})", [], "error", "checkpoint" if kind == "not-synco"
                      else "cannot read", run=run_corrupt_ckpt(kind)))
    for kind, needle in (("nobackbone", "metadata"), ("notjson", "metadata"), ("nometa", "backbone=NAME"),
                         ("garbage", "safetensors")):
        c.append(Case(f"eval: safetensors {kind}", [], "error", needle, run=run_safetensors(kind)))
    c.append(Case("eval: safetensors without metadata, backbone= given", [], "ok", run=run_plain_safetensors,
                  check=lambda env, err: True))
    c.append(Case("eval: linear on a run (1 epoch)", E("linear", "epochs=1", "warmup_epochs=0", "device=cpu",
                                                       "num_workers=0", "batch_size=64"), "ok",
                  check=lambda env, err: (env.tmp / f"out{env.n}" / "linear.json").exists()))
    c.append(Case("eval: linear lrs empty", E("linear", "lrs=[]", "epochs=1", "warmup_epochs=0"), "error", "lrs"))
    c.append(Case("eval: linear epochs < default warm-up", E("linear", "epochs=1"), "error", "warmup_epochs"))
    c.append(Case("eval: robustness without head", lambda env: ["eval", "robustness", "--checkpoint", env.data["run"],
                                                                "--linear-head", env.tmp / "nohead", "--out",
                                                                env.out()], "error", "nohead"))
    c.append(Case("report: nothing to report", lambda env: ["report", env.tmp / "digits", "--out", env.out()],
                  "error", ""))

    c += option_cases(P, E)

    # --- exports and the timm route
    c.append(Case("export: bn_before_mlp is not written for timm (item 8)", [], "ok", run=run_bn_export,
                  check=lambda env, err: True))
    c.append(Case("export: README timm route, cpu-demo ViT and Swin-T (item 9)", [], "ok",
                  run=check_timm_route, check=lambda env, err: True))

    # --- signals
    c.append(Case("signal: SIGTERM to the main process", [], "signal", run=run_signal(signal.SIGTERM),
                  check=check_signal, subprocess=True))
    c.append(Case("signal: SIGINT to the main process", [], "signal", run=run_signal(signal.SIGINT),
                  check=check_signal, subprocess=True))
    c.append(Case("signal: SIGTERM to the process group (workers too)", [], "signal",
                  run=run_signal(signal.SIGTERM, workers=1, group=True), check=check_signal, subprocess=True))
    c.append(Case("signal: SIGTERM without workers", [], "signal", run=run_signal(signal.SIGTERM, workers=0),
                  check=check_signal, subprocess=True))
    c += readback_cases()
    return c


def option_cases(P, E) -> list[Case]:
    """Issue 20's one validation layer: every command's options checked before any work (finite floats, bounds,
    list element types with scientific notation, output places), and the config files' own errors."""
    c: list[Case] = []
    R = ["device=cpu", "num_workers=0"]
    quick_linear, quick_finetune = ["epochs=1", "warmup_epochs=0", "cache_features=true"], ["epochs=1",
                                                                                           "warmup_epochs=0"]
    errors = [
        ("eval linear lrs=[.inf]", E("linear", *R, *quick_linear, "lrs=[.inf]"), "option 'lrs'"),
        ("eval linear weight_decay=.nan", E("linear", *R, *quick_linear, "weight_decay=.nan"), "option 'weight_decay'"),
        ("eval linear seed=-1", E("linear", *R, *quick_linear, "seed=-1"), "option 'seed'"),
        ("eval finetune lr=.nan", E("finetune", *R, *quick_finetune, "lr=.nan"), "option 'lr'"),
        ("eval finetune lr=.inf", E("finetune", *R, *quick_finetune, "lr=.inf"), "option 'lr'"),
        ("eval finetune clip_grad=.nan", E("finetune", *R, *quick_finetune, "clip_grad=.nan"), "option 'clip_grad'"),
        ("eval knn batch_size=0", E("knn", *R, "batch_size=0"), "option 'batch_size'"),
        ("eval knn batch_size=-5", E("knn", *R, "batch_size=-5"), "option 'batch_size'"),
        ("eval knn num_workers=-1", E("knn", "device=cpu", "num_workers=-1"), "option 'num_workers'"),
        ("eval knn image_size=64 on a 16-px backbone", E("knn", *R, "image_size=64"), "built for 16 px"),
        ("eval knn k=[1e1] is an integer, temperature=.nan", E("knn", *R, "k=[1e1]", "temperature=.nan"),
         "option 'temperature'"),
        ("eval efficiency warmup_steps=-1", lambda env: ["eval", "efficiency", "--out", env.out(), "--methods",
                                                         "moby", "device=cpu", "warmup_steps=-1"],
         "option 'warmup_steps'"),
        ("eval efficiency threads=-1", lambda env: ["eval", "efficiency", "--out", env.out(), "threads=-1"],
         "option 'threads'"),
        ("eval efficiency peak_size=-1", lambda env: ["eval", "efficiency", "--out", env.out(), "peak_size=-1"],
         "option 'peak_size'"),
        ("visualize max_images=0", lambda env: ["visualize", "--checkpoint", env.data["run"], "--out", env.out(),
                                                "device=cpu", "max_images=0"], "option 'max_images'"),
        ("synth-data train norm_num_groups=0", lambda env: ["synth-data", "train", "--data", "digits", "--out",
                                                            env.out(), "norm_num_groups=0"], "'norm_num_groups'"),
        ("synth-data train beta_schedule=nope", lambda env: ["synth-data", "train", "--data", "digits", "--out",
                                                             env.out(), "beta_schedule=nope"], "'beta_schedule'"),
        ("synth-data generate guidance=.nan (item 12)",
         lambda env: ["synth-data", "generate", "--model", env.tmp / "nomodel", "--per-class", "1", "--out",
                      env.out(), "guidance=.nan"], "'guidance'"),
    ]
    for name, argv, needle in errors:
        c.append(Case(f"options: {name}", argv, "error", needle))
    for name, extra, needle in [
        ("queue_size 10^12", ["contrast.queue_size=1000000000000"], "contrast.queue_size"),
        ("proj_hidden 10^11", ["model.proj_hidden=100000000000"], "model.proj_hidden"),
        ("image_size 100000", ["data.image_size=100000", "model.backbone_kwargs={img_size: 100000, patch_size: 8, "
                                                         "embed_dim: 32, depth: 1, num_heads: 2}"], "data.image_size"),
        ("threads 100000 (was a segfault)", ["threads=100000"], "threads"),
    ]:
        c.append(Case(f"options: pretrain {name}", P(*extra), "error", needle))
    c.append(Case("options: pretrain seed 2^63-1 (was an overflow)", P("epochs=1", "seed=9223372036854775807"), "ok",
                  check=lambda env, err: (env.tmp / f"out{env.n}" / "summary.json").exists()))
    c.append(Case("options: eval linear lrs=[1e-1, 5e-1] (scientific notation in a list)",
                  E("linear", *R, *quick_linear, "lr_batch_ref=0", "lrs=[1e-1, 5e-1]"), "ok",
                  check=lambda env, err: [r["lr"] for r in result(env.tmp / f"out{env.n}", "linear")["grid"]]
                  == [0.1, 0.5]))
    c.append(Case("options: eval robustness benchmarks=[] keeps the earlier result", [], "error", "'benchmarks'",
                  run=run_empty_benchmarks))
    c += config_file_cases()
    c += output_place_cases()
    return c


def run_empty_benchmarks(env: Env) -> tuple[int, str]:
    out = env.out()
    out.mkdir()
    (out / "robustness.json").write_text("{}")
    rc, err = call(["eval", "robustness", "--checkpoint", env.data["run"], "--linear-head", env.tmp / "nohead",
                    "--out", out, "device=cpu", "benchmarks=[]"])
    if (out / "robustness.json").read_text() != "{}":
        return -2, "the earlier robustness.json was overwritten"
    return rc, err


def _spec_file(env: Env, name: str, **extra) -> Path:
    path = env.tmp / f"{name}.yaml"  # JSON is YAML
    path.write_text(json.dumps({"base": "cpu-demo", "seeds": 1, "overrides": TINY,
                                "axes": {"grid": {"method": ["moby"]}}, **extra}))
    return path


def config_file_cases() -> list[Case]:
    def config(content: bytes):
        def argv(env):
            path = env.tmp / f"config{env.n}.yaml"
            path.write_bytes(content)
            return ["pretrain", "--config", path, "--out", env.out()]
        return argv

    def binary_saved(env):
        out = env.out()
        (out / "method-moby" / "seed0").mkdir(parents=True)
        (out / "method-moby" / "seed0" / "config.yaml").write_bytes(b"\xff\xfe\x00\x81")
        return ["sweep", _spec_file(env, "spec-binary"), "--out", out, "--dry-run"]
    return [Case("options: config base: 5", config(b"base: 5\n"), "error", "'base'"),
            Case("options: config base: [cpu-demo]", config(b"base: [cpu-demo]\n"), "error", "'base'"),
            Case("options: binary --config", config(b"\xff\xfe\x00\x81"), "error", "not a text YAML file"),
            Case("options: --config naming a folder", lambda env: ["pretrain", "--config", env.tmp / "digits", "--out",
                                                                   env.out()], "error", "is a folder"),
            Case("options: binary config.yaml in a sweep run", binary_saved, "error", "cannot be read"),
            Case("options: sweep linear: {foo: 1} fails the dry run",
                 lambda env: ["sweep", _spec_file(env, "spec-linear", linear={"foo": 1}), "--out", env.out(),
                              "--dry-run"], "error", "unknown option 'foo'")]


def output_place_cases() -> list[Case]:
    commands = {
        "sweep": lambda env, out: ["sweep", _spec_file(env, "spec-out"), "--out", out],
        "report": lambda env, out: ["report", env.data["run"], "--out", out],
        "report curves": lambda env, out: ["report", "curves", env.data["run"], "--out", out / "c.png"],
        "visualize": lambda env, out: ["visualize", "--checkpoint", env.data["run"], "device=cpu", "--out", out],
        "eval efficiency": lambda env, out: ["eval", "efficiency", "--methods", "moby", "device=cpu", "--out", out],
    }
    c = []
    for name, argv in commands.items():
        c.append(Case(f"options: --out an existing file ({name})", lambda env, a=argv: a(env, env.data["afile"]),
                      "error", "afile"))
        c.append(Case(f"options: --out under /proc ({name})", lambda env, a=argv: a(env, Path("/proc/synco-x")),
                      "error", "/proc"))
    return c



def readback_cases() -> list[Case]:
    """Issue 20: what is read back from disk, caches and data folders, and the OS errors of paths."""
    c: list[Case] = []

    def R(name, expect, run, needle="", check=None):
        c.append(Case(f"readback: {name}", [], expect, needle, run=run,
                      check=check or (lambda env, err: True)))

    def transfer_done(env, err):
        return result(env.tmp / f"out{env.n}", "transfer")["results"]["voc2007"]["linear"]["n_train"] == 4

    R("k-NN at temperature 0.01 is a stable vote (item 1)", "ok", run_knn_small_temperature)
    R("NaN weights are not evaluated (item 2)", "error", lambda env: call(
        ["eval", "knn", "--checkpoint", _readback_run(env, poison=True), "--out", env.out(), *KNN]), "non-finite")
    R("NaN linear head in robustness, earlier result kept (item 6)", "error", run_nan_head, "not finite")
    R("pickled linear_head.pt: no weights_only advice", "error", run_pickled_head, "cannot read")
    R("val class folder renamed: matched by name (item 3)", "error", run_renamed_val_class, "different classes")
    R("k-NN cache after val images overwritten under the same names (item 4)", "ok", run_cache_contents)
    R("linear probe after the run trained further (item 7)", "ok", run_linear_stale)
    R("eval linear on an --out in use (item 8)", "error", run_locked_eval, "in use")
    R("report: two runs named run1, synco and byol (item 9)", "ok", run_report_two_run1)
    R("report: a knn.json whose top1 is a string", "error", run_report_string, "not a number")
    R("sweep: re-run with another data.root (item 10)", "error", run_sweep_other_root, "data.root")
    R("sweep: a torn summary.json is not a finished run", "ok", run_sweep_torn_summary)
    R("synth-data: damaged generation.json (item 11)", "error", run_generate_damaged("settings"), "generation.json")
    R("synth-data: a manifest that is a JSON list", "error", run_generate_damaged("manifest"), "manifest.jsonl")
    R("resume: torn and garbage lines in metrics.jsonl", "ok", run_torn_metrics)
    R("resume: a checkpoint whose step is a string", "error", run_string_step, "step")
    R("transfer: truncated VOC XML", "error", run_transfer_voc("truncated xml"), "tr1.xml")
    R("transfer: VOC <object> without <name>", "error", run_transfer_voc("object without name"), "tr1.xml")
    R("transfer: truncated Cars .mat", "error", run_transfer_cars, ".mat")
    R("transfer: a garbage and a missing image are skipped", "ok", run_transfer_voc("corrupt image"),
      check=transfer_done)
    R("transfer: SUN397 fallback split ignores the listing order", "ok", run_sun397_order)
    R("robustness: ImageNet-v2 folders on an ImageNet-100 head", "ok", run_v2_imagenet100)
    R("robustness: benchmarks=[]", "error", run_robustness_asked(["benchmarks=[]"]), "benchmarks")
    R("robustness: benchmarks=[a] without imagenet_a_root", "error", run_robustness_asked(["benchmarks=[a]"]),
      "imagenet_a_root")
    R("robustness: imagenet_a_root that does not exist", "error",
      run_robustness_asked(["imagenet_a_root={tmp}/nowhere"]), "imagenet_a_root")
    R("data: a symlink loop in an image folder is followed once", "ok", run_symlink_loop_folder)
    R("os: 300-character --checkpoint", "error", run_long_name("checkpoint"), "too long")
    R("os: 300-character --out", "error", run_long_name("out"), "too long")
    R("os: --out through a symlink loop (eval)", "error", run_out_loop("eval"), "symbolic link")
    R("os: --out through a symlink loop (sweep)", "error", run_out_loop("sweep"), "symbolic link")
    R("eval: bare safetensors with backbone= given", "ok", lambda env: call(
        ["eval", "knn", "--checkpoint", _bare_safetensors(env), "--out", env.out(), "backbone=cpu-demo",
         "backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", *KNN]))
    return c


def corrupt_one(env: Env) -> Path:
    root = env.tmp / "onebad"
    if not root.exists():
        shutil.copytree(env.data["digits"], root)
        next((root / "train").rglob("*.png")).write_bytes(b"broken")
    return root


# ---------------------------------------------------------------------------------------------


def classify(case: Case, env: Env, rc: int, err: str) -> str:
    if rc == -1 or "Traceback" in err:
        return "raw tracebacks"
    if rc == -2:
        return "silently wrong"
    if rc == -3:
        return "unclear errors"
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith(("WARNING", "INFO"))]
    if case.expect == "error":
        if rc == 0:
            return "silently wrong"
        clear = rc == 2 and any(line.startswith("synco: error:") for line in lines) and case.needle in err \
            and "Original Traceback" not in err
        return "clear errors" if clear else "unclear errors"
    if case.expect == "signal":
        if rc not in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            return "unclear errors"
        return "handled correctly" if case.check(env, err) else "silently wrong"
    if rc != 0:
        return "unclear errors" if rc == 2 else "raw tracebacks"
    try:
        ok = case.check is None or case.check(env, err)
    except Exception:  # noqa: BLE001
        ok = False
    return "handled correctly" if ok else "silently wrong"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder, deleted)")
    ap.add_argument("--verbose", action="store_true", help="print stderr of every case that is not as expected")
    ap.add_argument("--no-subprocess", action="store_true", help="skip the cases that start processes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="synco-adversarial-"))
    tmp.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(tmp)
    t0 = time.time()
    try:
        env = make_env(tmp)
        tally = dict.fromkeys(CATEGORIES, 0)
        selected = [c for c in cases() if (not args.only or args.only in c.name)
                    and not (args.no_subprocess and c.subprocess)]
        for case in selected:
            t = time.time()
            if case.run is not None:
                try:
                    rc, err = case.run(env)
                except BaseException:  # noqa: BLE001
                    rc, err = -1, traceback.format_exc()
            else:
                argv = case.argv(env) if callable(case.argv) else case.argv
                rc, err = call(argv)
            outcome = classify(case, env, rc, err)
            tally[outcome] += 1
            expected = {"error": "clear errors"}.get(case.expect, "handled correctly")
            mark = "ok " if outcome == expected else "BAD"
            print(f"{mark} {outcome:18s} {time.time() - t:6.1f}s  {case.name}", flush=True)
            if outcome != expected and args.verbose:
                print("    " + "\n    ".join(err.strip().splitlines()[-8:]), flush=True)
        print(f"\n{len(selected)} cases in {time.time() - t0:.0f} s")
        print("| outcome | cases |\n|---|---|")
        for k in CATEGORIES:
            print(f"| {k} | {tally[k]} |")
        return 0 if tally["raw tracebacks"] == tally["silently wrong"] == tally["unclear errors"] == 0 else 1
    finally:
        os.chdir(cwd)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
