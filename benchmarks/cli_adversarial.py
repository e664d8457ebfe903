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


def tiny(*later: str) -> list[str]:
    """TINY with the keys given after it replacing TINY's: synco refuses one key given twice with different
    values, and what the harness means by TINY then epochs=1 is "epochs=1 instead". A malformed override (a case
    testing it) is passed on as it is, for synco to refuse."""
    given = {o.split("=", 1)[0].strip() for o in later if "=" in o}
    return [o for o in TINY if o.split("=", 1)[0] not in given] + list(later)

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
    rc, err = call(["pretrain", "--no-progress", "--out", str(run), *tiny("epochs=1")])
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
    first = spawn(["pretrain", "--no-progress", "--out", out, *tiny("epochs=400", "data.max_images=64")])
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.2)
        rc, err = call(["pretrain", "--no-progress", "--out", out, *tiny("epochs=400", "data.max_images=64")])
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
    return call(["pretrain", "--no-progress", "--out", out, *tiny("epochs=1")])


def run_signal(sig: int, workers: int = 1, group: bool = False):
    def runner(env: Env) -> tuple[int, str]:
        out = env.out()
        env.data["signal_out"] = out
        proc = spawn(["pretrain", "--no-progress", "--out", out, *tiny("epochs=400", "data.max_images=64",
                      f"data.num_workers={workers}")], start_new_session=group)
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
    argv = ["pretrain", "--no-progress", "--out", out, *tiny("epochs=30", "data.max_images=64")]
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
    argv = ["pretrain", "--no-progress", "--out", out, *tiny("data.dataset=folder", f"data.root={env.data['digits']}",
            *[o for o in FOLDER if not o.startswith("epochs=")], "epochs=2")]
    from synco.config import load_config
    from synco.engine.train import Trainer, stop_at_step

    cfg = load_config("cpu-demo", argv[4:])
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
            rc, err = call(["pretrain", "--no-progress", "--out", mnt / "run", *tiny("epochs=1")])
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
                rc, err = call(["pretrain", "--no-progress", "--out", mnt / "run", *tiny("epochs=1")])
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
    rc, err = call(["pretrain", "--no-progress", "--out", out, *tiny("epochs=1")])
    if rc == 0 and leaked.exists():
        return -2, "the leaked temp file is still there"
    return rc, err


def run_bn_export(env: Env) -> tuple[int, str]:
    import timm

    out = env.out()
    rc, err = call(["pretrain", "--no-progress", "--out", out, *tiny("model.bn_before_mlp=true", "epochs=1")])
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
    rc, err = call(["pretrain", "--no-progress", "--out", out, *tiny("epochs=2")])
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
    rc, err = call(["pretrain", "--no-progress", "--out", out, *tiny("epochs=1")])
    if rc == 0 and len(epoch_images(out)) != 1:
        return -2, f"metrics.jsonl holds {len(epoch_images(out))} epoch ends after the resume"
    return rc, err


def run_string_step(env: Env) -> tuple[int, str]:
    out = env.out()
    shutil.copytree(env.data["run"], out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["step"] = str(state["step"])
    torch.save(state, out / "checkpoint.pt")
    return call(["pretrain", "--no-progress", "--out", out, *tiny("epochs=1")])


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
        train, _ = sun397_split(ds, root, 2, TransferOptions().seed)
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
        return lambda env: ["pretrain", "--no-progress", "--out", env.out(), *tiny(*extra)]

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
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *tiny(*FOLDER,
                               f"data.root={env.data['digits']}")], "ok",
                  check=lambda env, err: "folder" in (env.tmp / f"out{env.n}" / "config.yaml").read_text()
                  and epoch_images(env.tmp / f"out{env.n}") == [60]))  # the folder's 60 images, not 1437 digits
    c.append(Case("config: image_size follows a backbone without img_size",
                  P("model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                    "data.image_size=32", "epochs=1"), "ok",
                  check=lambda env, err: "img_size: 32" in (env.tmp / f"out{env.n}" / "config.yaml").read_text()))
    c.append(Case("config: method moby / byol run", P("method=byol", "epochs=1"), "ok", check=lambda env, err: True))

    # --- resume
    c.append(Case("resume: other backbone", lambda env: ["pretrain", "--out", env.data["run"], *tiny("epochs=1",
                                                         "model.backbone=vit_small_patch16_224")], "error",
                  "vit_small_patch16_224"))
    c.append(Case("resume: other temperature", lambda env: ["pretrain", "--out", env.data["run"], *tiny("epochs=1",
                                                            "contrast.temperature=0.1")], "error",
                  "contrast.temperature"))
    c.append(Case("resume: resume=false on a run", lambda env: ["pretrain", "--out", env.data["run"],
                                                               *tiny("epochs=1", "resume=false")], "error",
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
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *tiny(*FOLDER, "data.dataset=folder",
                               f"data.root={corrupt_one(env)}")], "ok",
                  check=lambda env, err: summary(env.tmp / f"out{env.n}")["bad_images"] == 1))
    c.append(Case("data: every image corrupt (workers)",
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *tiny(*FOLDER, "data.dataset=folder",
                               f"data.root={env.data['bad']}", "data.num_workers=1")], "error", "could not be read"))
    c.append(Case("data: every image corrupt (no workers)",
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *tiny(*FOLDER, "data.dataset=folder",
                               f"data.root={env.data['bad']}")], "error", "could not be read"))
    c.append(Case("data: empty class folder", lambda env: ["pretrain", "--out", env.out(), *tiny(*FOLDER,
                                                           "data.dataset=folder", f"data.root={env.data['emptycls']}")],
                  "error", "contain no images"))
    c.append(Case("data: no class folders", lambda env: ["pretrain", "--out", env.out(), *tiny(*FOLDER,
                                                         "data.dataset=folder", f"data.root={env.data['noclass']}")],
                  "error", "no class sub-folders"))
    c.append(Case("data: root is a file", lambda env: ["pretrain", "--out", env.out(), *tiny("data.dataset=folder",
                                                       f"data.root={env.data['afile']}")], "error", "afile"))
    c.append(Case("data: 16-bit PNGs (item 5)", lambda env: ["pretrain", "--no-progress", "--out", env.out(),
                                                             *tiny("optim.batch_size=4", "contrast.queue_size=16",
                                                                   "negatives.n_hard=4", "epochs=1",
                                                                   "data.dataset=folder",
                                                                   f"data.root={env.data['deep16']}")], "ok",
                  check=check_16bit))
    c.append(Case("data: one-class folder pretrain skips k-NN with a note",
                  lambda env: ["pretrain", "--no-progress", "--out", env.out(), *tiny("optim.batch_size=2",
                               "contrast.queue_size=8", "negatives.n_hard=4", "epochs=1", "knn_at_end=true",
                               "data.dataset=folder", f"data.root={env.data['one']}")], "ok",
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
    c += round3_cases()
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
    # Round three changed this contract: an evaluation stops at an unreadable image, naming it (a replaced image
    # was counted twice, silently).
    R("transfer: a garbage or a missing image stops it, named", "error", run_transfer_voc("corrupt image"),
      "cannot be read")
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


# ---------------------------------------------------------------------------------------------
# Round three (issue 20's closing note): new cases, as a new user or a careless script, on the commands that
# failed most (eval, sweep, synth-data, report, transfer, visualize, views, doctor). `--only round3` runs them.

R3_BACKBONE = ["backbone=vit_tiny_patch16_224",
               "backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"]
R3_LINEAR = ["--no-progress", "device=cpu", "num_workers=0", "epochs=1", "warmup_epochs=0"]


def _r3_odd_images(env: Env) -> Path:
    """The digits folder plus, in class 4 of both splits, one image of every odd kind a user's folder holds:
    CMYK JPEG, palette with transparency, LA, 1-bit, 32-bit float TIFF, RGBA, 1x1, 2000x2, 2x900, an upper-case
    extension, and an animated GIF (not an ImageFolder extension: left out)."""
    root = env.tmp / "r3-odd"
    if root.exists():
        return root
    shutil.copytree(env.data["digits"], root)
    rng = np.random.default_rng(0)

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    for split in ("train", "val"):
        d = root / split / "4"
        rgb(16, 16).convert("CMYK").save(d / "cmyk.jpg")
        rgb(16, 16).convert("P").save(d / "palette.png", transparency=0)
        rgb(16, 16).convert("LA").save(d / "la.png")
        Image.fromarray(rng.random((16, 16)) > 0.5).save(d / "onebit.png")
        Image.fromarray(rng.random((16, 16)).astype(np.float32), "F").save(d / "float.tiff")
        rgb(16, 16).convert("RGBA").save(d / "rgba.png")
        rgb(1, 1).save(d / "one.png")
        rgb(2000, 2).save(d / "wide.png")
        rgb(2, 900).save(d / "tall.png")
        rgb(16, 16).save(d / "UPPER.PNG")
        frames = [rgb(16, 16) for _ in range(3)]
        frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    return root


def _r3_run_b(env: Env) -> Path:
    """A second run of the same architecture as env.data['run'], with other weights."""
    return _readback_run(env, seed=5)


def _r3_head(env: Env) -> Path:
    """A real linear_head.pt of env.data['run'] on the digits folder (cached features: a second)."""
    return _r3_linear_out(env) / "linear_head.pt"


def _r3_knn_out(env: Env) -> Path:
    """A finished k-NN evaluation of env.data['run'] (the digits folder)."""
    out = env.tmp / "r3-knn"
    if not (out / "knn.json").exists():
        rc, err = call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN, "dataset=folder",
                        f"root={env.data['digits']}"])
        assert rc == 0, err
    return out


def _r3_wait(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float = 180) -> bool:
    """The handshake: wait until a file matching the glob appears (the command has started writing)."""
    folder, pattern = path_glob
    deadline = time.time() + timeout
    while time.time() < deadline:
        if folder.exists() and any(folder.glob(pattern)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _r3_stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def run_r3_relative(env: Env) -> tuple[int, str]:
    """--checkpoint ../run/checkpoint.pt and --out sub/../rel from a sub-folder: the result lands where the
    shell would put it and records the checkpoint's absolute path."""
    cwd = env.tmp / "r3-cwd"
    cwd.mkdir(exist_ok=True)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc, err = call(["eval", "knn", "--checkpoint", Path("..") / env.data["run"].name / "checkpoint.pt", "--out",
                        "sub/../rel", *KNN])
    finally:
        os.chdir(old)
    if rc:
        return rc, err
    res = result(cwd / "rel")
    if res.get("checkpoint_path") != str(env.data["run"] / "checkpoint.pt"):
        return -2, f"checkpoint_path recorded as {res.get('checkpoint_path')!r}"
    return 0, err


def run_r3_unicode(env: Env) -> tuple[int, str]:
    base = env.tmp / "r3 my runs"
    run = base / "rün ✓"
    if not run.exists():
        shutil.copytree(env.data["run"], run)
        shutil.copytree(env.data["digits"], base / "dïgits ✓")
    out = base / "é out"
    rc, err = call(["eval", "knn", "--checkpoint", run, "--out", out, *KNN, "dataset=folder",
                    f"root={base / 'dïgits ✓'}"])
    if rc == 0 and (result(out)["n_train"], result(out)["checkpoint_path"]) != (60, str(run)):
        return -2, f"n_train {result(out)['n_train']}, checkpoint_path {result(out)['checkpoint_path']}"
    return rc, err


def run_r3_class_list_bom(env: Env) -> tuple[int, str]:
    """A class list saved by Windows Notepad: a UTF-8 byte-order mark and CRLF line ends."""
    path = env.tmp / "r3-classes-bom.txt"
    path.write_bytes(b"\xef\xbb\xbf0\r\n1\r\n2\r\n")
    out = env.out()
    rc, err = call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN, "dataset=folder",
                    f"root={env.data['digits']}", f"class_list={path}"])
    if rc == 0 and result(out)["n_train"] != 18:
        return -2, f"{result(out)['n_train']} training images for 3 classes of 6"
    return rc, err


def run_r3_nan_cache(env: Env) -> tuple[int, str]:
    """A feature cache whose key is right but whose features are NaN (a damaged or hand-edited file)."""
    good = _r3_knn_out(env)
    out = env.out()
    shutil.copytree(good, out)
    cache = torch.load(out / "knn_features.pt", weights_only=True)
    cache["test"] = torch.full_like(cache["test"], float("nan"))
    torch.save(cache, out / "knn_features.pt")
    rc, err = call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN, "dataset=folder",
                    f"root={env.data['digits']}"])
    if rc == 0 and result(out)["results"] != result(good)["results"]:
        return -2, f"the NaN cache was used: {result(out)['results']} (fresh: {result(good)['results']})"
    return rc, err


def run_r3_bad_val_image(env: Env) -> tuple[int, str]:
    """One unreadable evaluation image: it must not be replaced by another (counted twice); 29 of 30, or an
    error naming it."""
    root = env.tmp / "r3-badval"
    if not root.exists():
        shutil.copytree(env.data["digits"], root)
        sorted((root / "val" / "3").iterdir())[0].write_bytes(b"garbage")
    out = env.out()
    rc, err = call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN, "dataset=folder",
                    f"root={root}"])
    if rc == 2 and "synco: error" in err:
        return 0, err
    if rc == 0 and result(out)["n_test"] != 29:
        return -2, (f"n_test={result(out)['n_test']} with 29 readable images: the unreadable one was replaced by "
                    "its neighbour, which is counted twice")
    return rc, err


def run_r3_rerun_knn(env: Env) -> tuple[int, str]:
    good = _r3_knn_out(env)
    out = env.out()
    shutil.copytree(good, out)
    rc, err = call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN, "dataset=folder",
                    f"root={env.data['digits']}"])
    if rc == 0 and result(out)["results"] != result(good)["results"]:
        return -2, "a re-run on a finished --out changed the numbers"
    return rc, err


def _r3_linear_out(env: Env) -> Path:
    """A finished `eval linear` of env.data['run'] on the digits folder, made once; cases copy it or read it."""
    out = env.tmp / "r3-linear"
    if not (out / "linear.json").exists():
        rc, err = call(["eval", "linear", "--checkpoint", env.data["run"], "--out", out, *R3_LINEAR,
                        "cache_features=true", "dataset=folder", f"root={env.data['digits']}"])
        assert rc == 0, err
    return out


def run_r3_linear_damaged(what: str):
    def runner(env: Env) -> tuple[int, str]:
        out = env.out()
        shutil.copytree(_r3_linear_out(env), out)
        extra = []
        if what == "ckpt":
            data = (out / "linear_ckpt.pt").read_bytes()
            (out / "linear_ckpt.pt").write_bytes(data[:300])
        elif what == "json":
            (out / "linear.json").write_text("garbage")
        elif what == "settings":
            extra = ["lrs=[0.3]"]
        rc, err = call(["eval", "linear", "--checkpoint", env.data["run"], "--out", out, *R3_LINEAR,
                        "cache_features=true", "dataset=folder", f"root={env.data['digits']}", *extra])
        if what == "json" and rc == 0:
            if result(out, "linear")["top1"] != result(_r3_linear_out(env), "linear")["top1"]:
                return -2, "the re-run wrote another number"
        return rc, err
    return runner


def run_r3_linear_sigint(env: Env) -> tuple[int, str]:
    out = env.out()
    env.data["r3_sigint_linear"] = out
    argv = ["eval", "linear", "--checkpoint", env.data["run"], "--out", out, "--no-progress", "device=cpu",
            "num_workers=0", "epochs=60", "warmup_epochs=0", "dataset=folder", f"root={env.data['digits']}"]
    proc = spawn(argv)
    if not _r3_wait((out, "linear_ckpt.pt"), proc):
        _r3_stop(proc)
        return -1, "the probe never wrote linear_ckpt.pt"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    rc2, err2 = call(argv)
    env.data["r3_sigint_linear_rerun"] = (rc2, err2)
    return proc.returncode, err


def check_r3_linear_sigint(env: Env, err: str) -> bool:
    rc2, _ = env.data["r3_sigint_linear_rerun"]
    out = env.data["r3_sigint_linear"]
    return "SIGINT" in err and rc2 == 0 and len(result(out, "linear")["history"]) == 60 \
        and not (out / ".synco.lock").exists()


def run_r3_finetune_nan_resume(env: Env) -> tuple[int, str]:
    """A finetune_ckpt.pt of epoch 1 of 2 whose weights are NaN (damaged on disk): the resume must name the
    file, not blame the learning rate."""
    out = env.out()
    argv = ["eval", "finetune", "--checkpoint", env.data["run"], "--out", out, "--no-progress", "device=cpu",
            "num_workers=0", "epochs=2", "warmup_epochs=0", "dataset=folder", f"root={env.data['digits']}"]
    rc, err = call(argv)
    if rc:
        return rc, err
    state = torch.load(out / "finetune_ckpt.pt", weights_only=True)
    state["epoch"], state["history"] = 1, state["history"][:1]
    state["step"] = state.get("step", 2) // 2
    for v in state["model"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, out / "finetune_ckpt.pt")
    (out / "finetune.json").unlink()
    return call(argv)


def run_r3_lock_holder(env: Env) -> tuple[int, str]:
    """A fine-tune is running on --out; a k-NN on the same --out is refused and must name the holder's command
    (the fine-tune), not its own."""
    out = env.out()
    proc = spawn(["eval", "finetune", "--checkpoint", env.data["run"], "--out", out, "--no-progress", "device=cpu",
                  "num_workers=0", "epochs=300", "warmup_epochs=0", "dataset=folder", f"root={env.data['digits']}"])
    try:
        if not _r3_wait((out, "finetune_ckpt.pt"), proc):
            return -1, "the fine-tune never wrote finetune_ckpt.pt"
        return call(["eval", "knn", "--checkpoint", env.data["run"], "--out", out, *KNN])
    finally:
        _r3_stop(proc)


def _r3_sun(env: Env, variant: str) -> Path:
    """SUN397 with its partition files (Training_01.txt / Testing_01.txt), 2 classes of 6 images."""
    root = env.tmp / f"r3-sun-{variant}"
    if root.exists():
        return root
    sun = root / "SUN397"
    sun.mkdir(parents=True)
    (sun / "ClassName.txt").write_text("/a/abbey\n/b/bar\n")
    train, test = [], []
    for cls in ("a/abbey", "b/bar"):
        (sun / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (40 * i, 100 if cls[0] == "a" else 0, 0)).save(sun / cls / f"sun_{i}.jpg")
            (train if i < 3 else test).append(f"/{cls}/sun_{i}.jpg")
    if variant == "noslash":  # the partition files as a script would write them: relative paths
        train, test = [p[1:] for p in train], [p[1:] for p in test]
    if variant == "missing":  # an incomplete extraction: two listed training images are not on disk
        (sun / "a/abbey/sun_0.jpg").unlink()
        (sun / "a/abbey/sun_1.jpg").unlink()
    (sun / "Training_01.txt").write_text("\n".join(train) + "\n")
    (sun / "Testing_01.txt").write_text("\n".join(test) + "\n")
    return root


def _r3_transfer(env: Env, root: Path, datasets: str, out: Optional[Path] = None) -> tuple[int, str]:
    return call(["eval", "transfer", "--checkpoint", env.data["run"], "--out", out or env.out(), "--datasets",
                 datasets, f"root={root}", "linear.epochs=1", "linear.warmup_epochs=0", "batch_size=4", *KNN[:3]])


def run_r3_sun_missing(env: Env) -> tuple[int, str]:
    out = env.out()
    rc, err = _r3_transfer(env, _r3_sun(env, "missing"), "sun397", out)
    if "sun_0.jpg" in err and rc in (0, 2):
        return 0, err  # skipped and said so, or refused naming the file
    if rc == 0:
        n = result(out, "transfer")["results"]["sun397"]["linear"]["n_train"]
        return -2, f"2 listed training images missing from disk: trained on {n} of 6 without a word"
    return rc, err


def run_r3_sun_noslash(env: Env) -> tuple[int, str]:
    """Partition files written without the leading '/': the same images as the official form (3 + 3 per class)."""
    out = env.out()
    rc, err = _r3_transfer(env, _r3_sun(env, "noslash"), "sun397", out)
    if rc == 0:
        linear = result(out, "transfer")["results"]["sun397"]["linear"]
        if (linear["n_train"], linear["n_test"]) != (6, 6):
            return -2, f"n_train={linear['n_train']}, n_test={linear['n_test']} of 6 and 6 listed"
    return rc, err


def run_r3_voc_missing_test(env: Env) -> tuple[int, str]:
    root = _voc(env)
    (root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "te2.jpg").unlink()
    out = env.out()
    rc, err = call(["eval", "transfer", "--checkpoint", env.data["run"], "--out", out, "--datasets", "voc2007",
                    f"root={root}", "linear.epochs=1", "linear.warmup_epochs=0", "batch_size=4", *KNN[:3]])
    if rc == 2 and "te2" in err:
        return 0, err
    if rc == 0 and result(out, "transfer")["results"]["voc2007"]["linear"]["n_test"] != 3:
        n = result(out, "transfer")["results"]["voc2007"]["linear"]["n_test"]
        return -2, f"n_test={n} with 3 test images on disk: the missing one was replaced by another, counted twice"
    return rc, err


def run_r3_head_other_weights(protocol: str):
    def runner(env: Env) -> tuple[int, str]:
        extra = ["--attacks", "fgsm", "--max-images", "8"] if protocol == "adversarial" else ["benchmarks=[clean]"]
        return call(["eval", protocol, "--checkpoint", _r3_run_b(env), "--linear-head", _r3_head(env), "--out",
                     env.out(), "--no-progress", "device=cpu", "num_workers=0", "dataset=folder",
                     f"root={env.data['digits']}", *extra])
    return runner


def run_r3_clean_classes(env: Env) -> tuple[int, str]:
    """benchmarks=[clean] on a folder whose classes the head does not know: the one benchmark asked for cannot
    be measured, so the command must fail and keep the earlier robustness.json."""
    out = env.out()
    out.mkdir()
    (out / "robustness.json").write_text('{"kept": true}')
    rc, err = call(["eval", "robustness", "--checkpoint", env.data["run"], "--linear-head", _r3_head(env), "--out",
                    out, "--no-progress", "device=cpu", "num_workers=0", "dataset=folder",
                    f"root={env.data['deep16']}", "benchmarks=[clean]"])
    if json.loads((out / "robustness.json").read_text()) != {"kept": True}:
        return (-2 if rc == 0 else rc), "the earlier robustness.json was overwritten by one without results\n" + err
    return rc, err


def _r3_report_folder(env: Env, name: str, top1) -> Path:
    folder = env.tmp / f"r3-report-{name}"
    if not folder.exists():
        shutil.copytree(_r3_knn_out(env), folder / "eval")
        text = (folder / "eval" / "knn.json").read_text()
        data = json.loads(text)
        data["results"]["20"]["top1"] = top1
        (folder / "eval" / "knn.json").write_text(json.dumps(data))  # NaN / Infinity as Python writes them
    return folder


def run_r3_report_same_folder(env: Env) -> tuple[int, str]:
    knn = _r3_knn_out(env)
    out = env.out()
    rc, err = call(["report", knn, f"{knn}/", knn / "knn.json", f"{knn}/../{knn.name}", "--out", out])
    if rc == 0:
        rows = (out / "report.csv").read_text().splitlines()[1:]
        if len(rows) != 1:
            return -2, f"one evaluation given four ways gives {len(rows)} rows: {rows}"
    return rc, err


def run_r3_report_efficiency(env: Env) -> tuple[int, str]:
    """`synco report runs` where runs/ holds an eval folder and runs/efficiency (the default --out of eval
    efficiency): no empty row with Run '?'."""
    base = env.tmp / "r3-report-runs"
    if not base.exists():
        shutil.copytree(_r3_knn_out(env), base / "run" / "eval")
        rc, err = call(["eval", "efficiency", "--out", base / "efficiency", "--methods", "moby", "--steps", "1",
                        "warmup_steps=0", "device=cpu", f"model.backbone_kwargs={R3_BACKBONE[1].split('=', 1)[1]}"])
        if rc:
            return rc, err
    out = env.out()
    rc, err = call(["report", base, "--out", out])
    if rc == 0:
        rows = (out / "report.csv").read_text().splitlines()
        if any(",?," in row or not any(ch.isdigit() for ch in row.split(",", 3)[-1]) for row in rows[1:]):
            return -2, "a row without numbers (Run '?') from efficiency.json:\n" + "\n".join(rows)
    return rc, err


def run_r3_report_torn(env: Env) -> tuple[int, str]:
    folder = env.tmp / "r3-report-torn"
    if not folder.exists():
        shutil.copytree(_r3_knn_out(env), folder / "a" / "eval")
        shutil.copytree(_r3_knn_out(env), folder / "b" / "eval")
        text = (folder / "b" / "eval" / "knn.json").read_text()
        (folder / "b" / "eval" / "knn.json").write_text(text[: len(text) // 2])
    return call(["report", folder, "--out", env.out()])


# --- sweeps


def _r3_spec(env: Env, name: str, text: str = "", seeds: int = 1, epochs: int = 2, **extra) -> Path:
    """A spec file: TINY overrides, one axis (method: [moby]); ``text`` replaces the whole file."""
    path = env.tmp / f"r3-spec-{name}.yaml"
    if text:
        path.write_text(text)
    else:
        overrides = [o for o in TINY if not o.startswith("epochs=")] + [f"epochs={epochs}"]
        path.write_text(json.dumps({"base": "cpu-demo", "seeds": seeds, "overrides": overrides,
                                    "axes": {"grid": {"method": ["moby"]}}, **extra}))
    return path


R3_LINEAR_SPEC = {"epochs": 1, "warmup_epochs": 0, "cache_features": True, "num_workers": 0, "device": "cpu"}


def _r3_sweep(env: Env) -> Path:
    """A finished sweep of two seeds with --linear (its probes cached in sweep_eval.json), made once."""
    out = env.tmp / "r3-sweep"
    if not (out / "sweep.md").exists():
        rc, err = call(["sweep", _r3_spec(env, "sweep", seeds=2, linear=R3_LINEAR_SPEC), "--out", out, "--linear",
                        "--no-progress"])
        assert rc == 0, err
    return out


def _r3_sweep_cell(out: Path, column: str) -> str:
    lines = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    return row[header.index(column)] if column in header else "(no column)"


def run_r3_sweep_summary(value):
    def runner(env: Env) -> tuple[int, str]:
        out = env.out()
        shutil.copytree(_r3_sweep(env), out)
        path = out / "method-moby" / "seed0" / "summary.json"
        data = json.loads(path.read_text())
        data["final_loss"] = value
        path.write_text(json.dumps(data))
        rc, err = call(["sweep", _r3_spec(env, "sweep", seeds=2, linear=R3_LINEAR_SPEC), "--out", out,
                        "--no-progress"])
        if rc == 0:
            cell = _r3_sweep_cell(out, "final_loss")
            if cell == "(no column)" or "n=1" in cell:
                return -2, f"summary.json final_loss={value!r}: the final_loss cell is {cell!r}, silently"
        if rc == 2 and "summary.json" not in err:
            return -3, err
        return rc, err
    return runner


def run_r3_sweep_eval_cache(value):
    def runner(env: Env) -> tuple[int, str]:
        out = env.out()
        shutil.copytree(_r3_sweep(env), out)
        fresh = _r3_sweep_cell(out, "linear_top1")
        path = out / "method-moby" / "seed0" / "sweep_eval.json"
        data = json.loads(path.read_text())
        data["linear_top1"] = value
        path.write_text(json.dumps(data))
        rc, err = call(["sweep", _r3_spec(env, "sweep", seeds=2, linear=R3_LINEAR_SPEC), "--out", out, "--linear",
                        "--no-progress"])
        if rc == 0 and _r3_sweep_cell(out, "linear_top1") != fresh:
            return -2, f"cached linear_top1={value!r} used: {_r3_sweep_cell(out, 'linear_top1')!r}, not {fresh!r}"
        return rc, err
    return runner


def run_r3_sweep_sigint(env: Env) -> tuple[int, str]:
    out = env.out()
    env.data["r3_sigint_sweep"] = out
    spec = _r3_spec(env, "sigint", seeds=2, epochs=60)
    proc = spawn(["sweep", spec, "--out", out, "--no-progress"])
    if not _r3_wait((out, "method-moby/seed0/checkpoint.pt"), proc):
        _r3_stop(proc)
        return -1, "the sweep's first run never wrote a checkpoint"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    deadline = time.time() + 30  # the runs' processes were told too; give them time to write and unlock
    while time.time() < deadline and any(out.rglob(".synco.lock")):
        time.sleep(0.2)
    env.data["r3_sigint_sweep_locks"] = [str(p) for p in out.rglob(".synco.lock")]
    env.data["r3_sigint_sweep_rerun"] = call(["sweep", spec, "--out", out, "--no-progress"])
    return proc.returncode, err


def check_r3_sweep_sigint(env: Env, err: str) -> bool:
    out = env.data["r3_sigint_sweep"]
    rc2, _ = env.data["r3_sigint_sweep_rerun"]
    return (not env.data["r3_sigint_sweep_locks"] and rc2 == 0
            and all((out / "method-moby" / f"seed{s}" / "summary.json").exists() for s in (0, 1)))


def run_r3_two_sweeps(env: Env) -> tuple[int, str]:
    out = env.out()
    spec = _r3_spec(env, "two", seeds=2, epochs=60)
    proc = spawn(["sweep", spec, "--out", out, "--no-progress"])
    try:
        if not _r3_wait((out, "method-moby/seed0/checkpoint.pt"), proc):
            return -1, "the first sweep never wrote a checkpoint"
        return call(["sweep", spec, "--out", out, "--no-progress"])
    finally:
        _r3_stop(proc)


# --- synth-data


def _r3_generate_argv(env: Env, out: Path, per_class: int) -> list:
    return ["synth-data", "generate", "--model", _diffusion(env), "--classes", "all", "--per-class", per_class,
            "--out", out, "--no-progress", "device=cpu", "batch_size=8"]


def run_r3_generate_sigint(env: Env) -> tuple[int, str]:
    out = env.out()
    env.data["r3_sigint_generate"] = out
    proc = spawn(_r3_generate_argv(env, out, 300))
    if not _r3_wait((out, "0/*.png"), proc):
        _r3_stop(proc)
        return -1, "generate never wrote an image"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    env.data["r3_sigint_generate_rerun"] = call(_r3_generate_argv(env, out, 2))
    return proc.returncode, err


def check_r3_generate_sigint(env: Env, err: str) -> bool:
    out = env.data["r3_sigint_generate"]
    rc2, _ = env.data["r3_sigint_generate_rerun"]
    manifest = (out / "manifest.jsonl").read_text().splitlines()
    images = [p for p in out.rglob("*.png") if not p.name.startswith(".")]
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    return rc2 == 0 and len(manifest) == 20 and len(images) >= 20 and not leftovers


def run_r3_two_generates(env: Env) -> tuple[int, str]:
    """Two generates with the same settings on one --out: the second must be refused (one lock per output
    folder), not rewrite generation.json and the manifest under the first."""
    out = env.out()
    proc = spawn(_r3_generate_argv(env, out, 300))
    try:
        if not _r3_wait((out, "0/*.png"), proc):
            return -1, "generate never wrote an image"
        return call(_r3_generate_argv(env, out, 1))
    finally:
        _r3_stop(proc)


def run_r3_viz_odd(env: Env) -> tuple[int, str]:
    out = env.out()
    rc, err = call(["visualize", "--checkpoint", env.data["run"], "--images", _r3_odd_images(env) / "train" / "4",
                    "--out", out, "device=cpu"])
    if rc == 0:
        text = (out / "metrics.json").read_text()
        if "NaN" in text or "Infinity" in text or len(json.loads(text)["images"]) != 17:
            return -2, "metrics.json holds NaN, or not the 17 images"
    return rc, err


def run_r3_views_odd(on: str):
    def runner(env: Env) -> tuple[int, str]:
        out = env.out()
        rc, err = call(["views", "--out", out, "--n", "70", "--save", "data.dataset=folder",
                        f"data.root={_r3_odd_images(env)}", f"data.augment.on={on}"])
        if rc == 0:
            views = torch.load(out / "views.pt", weights_only=True)
            if tuple(views["view1"].shape) != (70, 3, 16, 16) or tuple(views["view2"].shape) != (70, 3, 16, 16):
                return -2, f"views of shape {tuple(views['view1'].shape)}"
        return rc, err
    return runner


def round3_cases() -> list[Case]:
    c: list[Case] = []

    def R(name, expect, run, needle="", check=None, sub=False):
        c.append(Case(f"round3: {name}", [], expect, needle, run=run, subprocess=sub,
                      check=check or (lambda env, err: True)))

    def A(name, argv, needle):  # a command line that must be a clear error
        c.append(Case(f"round3: {name}", argv, "error", needle))

    def odd(env):
        return _r3_odd_images(env)

    # --- paths
    R("eval knn: relative --checkpoint ../run and --out sub/../rel", "ok", run_r3_relative)
    R("eval knn: --checkpoint, --out and root= with spaces and unicode", "ok", run_r3_unicode)
    R("eval knn: class_list with a UTF-8 BOM and CRLF (Windows Notepad)", "ok", run_r3_class_list_bom)
    A("eval knn: .synco.lock in --out is a folder", lambda env: ["eval", "knn", "--checkpoint", env.data["run"],
                                                                 "--out", _r3_lockdir(env), *KNN], ".synco.lock")
    # --- images of odd modes and shapes
    c.append(Case("round3: eval knn: CMYK, palette+transparency, LA, 1-bit, float TIFF, RGBA, 1x1, 2000x2, 2x900",
                  lambda env: ["eval", "knn", "--checkpoint", env.data["run"], "--out", env.out(), *KNN,
                               "dataset=folder", f"root={odd(env)}"], "ok",
                  check=lambda env, err: (result(env.tmp / f"out{env.n}")["n_train"],
                                          result(env.tmp / f"out{env.n}")["n_test"]) == (70, 40)))
    R("views: the odd images with on=device", "ok", run_r3_views_odd("device"))
    R("views: the odd images with on=workers", "ok", run_r3_views_odd("workers"))
    R("visualize: the odd images", "ok", run_r3_viz_odd)
    c.append(Case("round3: synth-data train: on the odd images",
                  lambda env: ["synth-data", "train", "--data", odd(env), "--out", env.out(), "--no-progress",
                               "steps=1", "block_out_channels=[8,16]", "norm_num_groups=4", "batch_size=8",
                               "preview=false", "device=cpu", "warmup_steps=1", "image_size=16"], "ok",
                  check=lambda env, err: (env.tmp / f"out{env.n}" / "synco_diffusion.json").exists()))
    # --- eval knn: caches, damaged inputs, overrides
    R("eval knn: a feature cache with the right key but NaN features is rebuilt", "ok", run_r3_nan_cache)
    R("eval knn: an unreadable val image is not counted twice", "ok", run_r3_bad_val_image)
    R("eval knn: re-run on a finished --out gives the same numbers", "ok", run_r3_rerun_knn)
    A("eval knn: the same key twice with other values (k=[1,20] k=[5])",
      lambda env: ["eval", "knn", "--checkpoint", env.data["run"], "--out", env.out(), *KNN, "k=[5]"], "'k'")
    # --- eval linear / finetune
    A("eval linear: val_fraction=0.99 of 60 images", lambda env: ["eval", "linear", "--checkpoint", env.data["run"],
                                                                   "--out", env.out(), *R3_LINEAR, "dataset=folder",
                                                                   f"root={env.data['digits']}", "val_fraction=0.99"],
      "val_fraction")
    R("eval linear: truncated linear_ckpt.pt", "error", run_r3_linear_damaged("ckpt"), "linear_ckpt.pt")
    R("eval linear: re-run on a finished --out with other lrs", "error", run_r3_linear_damaged("settings"),
      "other settings")
    R("eval linear: a garbage linear.json in --out is rewritten", "ok", run_r3_linear_damaged("json"))
    R("eval linear: SIGINT after linear_ckpt.pt appears, then the same command finishes", "signal",
      run_r3_linear_sigint, check=check_r3_linear_sigint, sub=True)
    R("eval finetune: resume from a finetune_ckpt.pt holding NaN weights names the file", "error",
      run_r3_finetune_nan_resume, "finetune_ckpt.pt")
    R("eval: a fine-tune holds --out; k-NN there is refused naming the fine-tune", "error", run_r3_lock_holder,
      "finetune", sub=True)
    # --- transfer
    R("transfer: SUN397 partition files with relative paths (no leading /) are read as the official ones", "ok",
      run_r3_sun_noslash)
    R("transfer: SUN397 partition files listing images missing from disk", "ok", run_r3_sun_missing)
    R("transfer: a missing VOC test image is not counted twice", "ok", run_r3_voc_missing_test)
    A("transfer: --datasets nope", lambda env: ["eval", "transfer", "--checkpoint", env.data["run"], "--out",
                                                env.out(), "--datasets", "nope", "root=/tmp"], "nope")
    A("transfer: --modes nope", lambda env: ["eval", "transfer", "--checkpoint", env.data["run"], "--out", env.out(),
                                             "--datasets", "voc2007", "--modes", "nope", "root=/tmp"], "nope")
    # --- robustness / adversarial / efficiency
    R("robustness: a linear head trained on other weights of the same architecture", "error",
      run_r3_head_other_weights("robustness"), "linear head")
    R("adversarial: a linear head trained on other weights of the same architecture", "error",
      run_r3_head_other_weights("adversarial"), "linear head")
    R("robustness: benchmarks=[clean] on a folder whose classes the head lacks", "error", run_r3_clean_classes,
      "classes")
    A("adversarial: --attacks ''", lambda env: ["eval", "adversarial", "--checkpoint", env.data["run"],
                                               "--linear-head", _r3_head(env), "--out", env.out(), "--attacks", "",
                                               "device=cpu"], "attack")
    A("adversarial: --attacks nope", lambda env: ["eval", "adversarial", "--checkpoint", env.data["run"],
                                                  "--linear-head", _r3_head(env), "--out", env.out(), "--attacks",
                                                  "nope", "device=cpu"], "nope")
    A("efficiency: --steps 2 and steps=3 disagree", lambda env: ["eval", "efficiency", "--out", env.out(), "--steps",
                                                                 "2", "steps=3", "--methods", "moby", "device=cpu",
                                                                 "warmup_steps=0", R3_BACKBONE[1].replace(
                                                                     "backbone_kwargs", "model.backbone_kwargs")],
      "steps")
    A("efficiency: --methods nope", lambda env: ["eval", "efficiency", "--out", env.out(), "--methods", "nope",
                                                 "device=cpu"], "nope")
    # --- report
    A("report: a knn.json whose top1 is NaN", lambda env: ["report", _r3_report_folder(env, "nan", float("nan")),
                                                          "--out", env.out()], "top1")
    A("report: a knn.json whose top1 is 250 %", lambda env: ["report", _r3_report_folder(env, "250", 250.0),
                                                            "--out", env.out()], "top1")
    R("report: one folder given four ways is one row", "ok", run_r3_report_same_folder)
    R("report: an efficiency.json among the results adds no empty row", "ok", run_r3_report_efficiency)
    R("report: a torn knn.json is not dropped with a warning", "error", run_r3_report_torn, "knn.json")
    A("report curves: --panels nope", lambda env: ["report", "curves", env.data["run"], "--panels", "nope", "--out",
                                                   env.out() / "c.png"], "nope")
    # --- sweep specs (dry runs)
    A("sweep: a spec with a key given twice (seeds: 1, seeds: 3)",
      lambda env: ["sweep", _r3_spec(env, "dupkey", "base: cpu-demo\nseeds: 1\nseeds: 3\n"
                                     "axes: {grid: {method: [moby]}}\n"), "--out", env.out(), "--dry-run"], "seeds")
    A("sweep: a spec with an axis given twice (method: [moby], method: [byol])",
      lambda env: ["sweep", _r3_spec(env, "dupaxis", "base: cpu-demo\nseeds: 1\naxes:\n  grid:\n"
                                     "    method: [moby]\n    method: [byol]\n"), "--out", env.out(), "--dry-run"],
      "method")
    A("sweep: metrics: [nope_metric] fails the dry run",
      lambda env: ["sweep", _r3_spec(env, "metrics", metrics=["nope_metric"]), "--out", env.out(), "--dry-run"],
      "nope_metric")
    A("sweep: linear: {root: /nonexistent} fails the dry run",
      lambda env: ["sweep", _r3_spec(env, "linroot", linear={"dataset": "folder", "root": "/nonexistent/r3"}),
                   "--out", env.out(), "--dry-run", "--linear"], "/nonexistent/r3")
    A("sweep: seeds: [0, 0]", lambda env: ["sweep", _r3_spec(env, "seeds00", seeds=[0, 0]), "--out", env.out(),
                                           "--dry-run"], "seeds")
    A("sweep: zip lists of unequal lengths",
      lambda env: ["sweep", _r3_spec(env, "zip", "base: cpu-demo\nseeds: 1\naxes: {zip: {model.drop_path_online: "
                                     "[0.0, 0.1], model.drop_path_target: [0.0]}}\n"), "--out", env.out(),
                   "--dry-run"], "equal lengths")
    A("sweep: --jobs 0", lambda env: ["sweep", _r3_spec(env, "jobs"), "--out", env.out(), "--dry-run", "--jobs", "0"],
      "--jobs")
    # --- sweep results edited by hand, signals, two at once
    R("sweep: re-run with a summary.json whose final_loss is NaN", "ok", run_r3_sweep_summary(float("nan")))
    R("sweep: re-run with a summary.json whose final_loss is a string", "ok", run_r3_sweep_summary("9.9"))
    R("sweep --linear: a cached linear_top1 of NaN in sweep_eval.json", "ok", run_r3_sweep_eval_cache(float("nan")))
    R("sweep --linear: a cached linear_top1 of 150 in sweep_eval.json", "ok", run_r3_sweep_eval_cache(150.0))
    R("sweep: SIGINT mid-run, then the same command finishes", "signal", run_r3_sweep_sigint,
      check=check_r3_sweep_sigint, sub=True)
    R("sweep: two sweeps on one --out", "error", run_r3_two_sweeps, "in use", sub=True)
    # --- synth-data
    for command in ("train", "generate", "fidelity"):
        def place(env, where, command=command):
            if command == "train":
                return ["synth-data", "train", "--data", "digits", "--out", where, "steps=1", "device=cpu"]
            if command == "generate":
                return ["synth-data", "generate", "--model", _diffusion(env), "--classes", "0", "--per-class", "1",
                        "--out", where, "device=cpu"]
            return ["synth-data", "fidelity", "--synthetic", env.data["digits"] / "train", "--out", where]
        A(f"synth-data {command}: --out an existing file", lambda env, p=place: p(env, env.data["afile"]), "afile")
        A(f"synth-data {command}: --out under /proc", lambda env, p=place: p(env, "/proc/synco-r3"), "/proc")
    R("synth-data generate: SIGINT mid-generation, then a re-run completes the manifest", "signal",
      run_r3_generate_sigint, check=check_r3_generate_sigint, sub=True)
    R("synth-data generate: two with the same settings on one --out", "error", run_r3_two_generates, "in use",
      sub=True)
    A("synth-data generate: --classes naming a class the model lacks",
      lambda env: ["synth-data", "generate", "--model", _diffusion(env), "--classes", "0,42", "--per-class", "1",
                   "--out", env.out(), "device=cpu"], "42")
    # --- visualize, views, doctor
    A("visualize: block=99 on a 1-block ViT", lambda env: ["visualize", "--checkpoint", env.data["run"], "--out",
                                                           env.out(), "device=cpu", "block=99"], "block")
    A("visualize: --label twice for one checkpoint", lambda env: ["visualize", "--checkpoint", env.data["run"],
                                                                  "--label", "a", "--label", "b", "--out", env.out(),
                                                                  "device=cpu"], "--label")
    A("visualize: --images an empty folder", lambda env: ["visualize", "--checkpoint", env.data["run"], "--images",
                                                          _r3_empty(env), "--out", env.out(), "device=cpu"],
      "no images")
    A("views: --n 0", lambda env: ["views", "--out", env.out(), "--n", "0"], "--n")
    A("views: --out an existing file", lambda env: ["views", "--out", env.data["afile"]], "afile")
    A("doctor: --json a folder", lambda env: ["doctor", "--json", env.tmp], "folder")
    A("doctor: --json under /proc", ["doctor", "--json", "/proc/synco-r3.json"], "/proc")
    A("doctor: --steps without --bench", ["doctor", "--steps", "0"], "--bench")
    A("doctor: --bench --batch-size 10^9", ["doctor", "--bench", "--batch-size", "1000000000"], "GiB")
    return c


def _r3_lockdir(env: Env) -> Path:
    out = env.out()
    (out / ".synco.lock").mkdir(parents=True)
    return out


def _r3_empty(env: Env) -> Path:
    path = env.tmp / "r3-empty"
    path.mkdir(exist_ok=True)
    return path


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
