"""Issue 20, what is read back: k-NN maths at small temperatures, non-finite weights and heads, class folders
matched by name, caches and resume fingerprints keyed by content, one lock per eval output, report rows per run,
sweep resume, synth-data bookkeeping, resume files, transfer datasets' metadata and images, OS errors.

Every test here failed before its fix. CPU only, fp32, tiny models: seconds each."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from synco.cli.main import main
from synco.config import load_config
from synco.errors import SyncoError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_KW = "model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"
EVAL = ["--no-progress", "device=cpu", "num_workers=0"]


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_clean_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = [line for line in err.strip().splitlines() if line.strip()][-1]
    assert last.startswith("synco: error:"), err
    for needle in needles:
        assert needle in last, (needle, last)


def tiny_backbone(seed: int = 0):
    from synco.models.backbone import backbone_from_config

    cfg = load_config("cpu-demo", [TINY_KW])
    torch.manual_seed(seed)
    return cfg, backbone_from_config(cfg.model)


def one_shot_run(run_dir: Path, seed: int, poison: bool = False) -> Path:
    """A run folder as `synco pretrain` leaves it (checkpoint.pt), backbone weights drawn from ``seed``."""
    cfg, bb = tiny_backbone(seed)
    state = bb.state_dict()
    if poison:
        state["cls_token"] = torch.full_like(state["cls_token"], float("nan"))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "model": {f"online.backbone.{k}": v for k, v in state.items()},
                "epoch": 1}, run_dir / "checkpoint.pt")
    return run_dir


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# 1. k-NN: a stable vote at any temperature


def _reference_knn_top1(ftr, ytr, fte, yte, k, t, num_classes):
    """Weighted k-NN in float64 with log-sum-exp per class (ties to the lower class index)."""
    s = (fte.double() @ ftr.double().t())
    top_s, top_i = s.topk(k, dim=1)
    hits = 0
    for q in range(fte.shape[0]):
        logv = torch.full((num_classes,), float("-inf"), dtype=torch.float64)
        for c in range(num_classes):
            m = ytr[top_i[q]] == c
            if m.any():
                logv[c] = torch.logsumexp(top_s[q][m] / t, 0)
        best = max(range(num_classes), key=lambda c: (logv[c].item(), -c))
        hits += int(best == int(yte[q]))
    return 100.0 * hits / fte.shape[0]


def test_knn_vote_is_stable_at_small_temperatures():
    from synco.eval.knn import knn_classify

    # Two neighbours at cosines 0.99 (class 1) and 0.95 (class 0): exp(s / 0.01) is inf for both in float32.
    q = torch.tensor([[1.0, 0.0]])
    train = torch.tensor([[0.99, (1 - 0.99 ** 2) ** 0.5], [0.95, -(1 - 0.95 ** 2) ** 0.5]])
    res = knn_classify(train, torch.tensor([1, 0]), q, torch.tensor([1]), ks=[2], temperature=0.01)
    assert res[2]["top1"] == 100.0
    g = torch.Generator().manual_seed(0)
    ftr = torch.nn.functional.normalize(torch.randn(60, 6, generator=g), dim=1)
    ytr = torch.randint(0, 5, (60,), generator=g)
    fte = torch.nn.functional.normalize(torch.randn(30, 6, generator=g), dim=1)
    yte = torch.randint(0, 5, (30,), generator=g)
    for t in (0.003, 0.01, 0.07):
        got = knn_classify(ftr, ytr, fte, yte, ks=[10], temperature=t, num_classes=5)[10]["top1"]
        assert got == pytest.approx(_reference_knn_top1(ftr, ytr, fte, yte, 10, t, 5)), t


# ---------------------------------------------------------------------------------------------
# 2 and 6. Non-finite weights and heads are refused


def test_nan_backbone_weights_are_refused(tmp_path, capsys):
    from synco.models.backbone import backbone_meta, export_safetensors

    run = one_shot_run(tmp_path / "run", 0, poison=True)
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", run, "--out", tmp_path / "e1", *EVAL)
    assert_clean_error(rc, err, "non-finite")
    cfg, bb = tiny_backbone(0)
    with torch.no_grad():
        bb.pos_embed.fill_(float("inf"))
    export_safetensors(bb, backbone_meta(cfg.model), tmp_path / "backbone.safetensors")
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", tmp_path / "backbone.safetensors", "--out",
                  tmp_path / "e2", *EVAL)
    assert_clean_error(rc, err, "non-finite", "pos_embed")
    assert not (tmp_path / "e1" / "knn.json").exists() and not (tmp_path / "e2" / "knn.json").exists()


def _head_file(path: Path, dim: int = 32, **change):
    from synco.eval.head import LinearHead, save_head

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_head(LinearHead(dim, 10), path, [str(d) for d in range(10)], {"backbone": "vit_tiny_patch16_224"}, 16)
    if change:
        state = torch.load(path, weights_only=True)
        state.update(change)
        torch.save(state, path)
    return path


def test_damaged_linear_heads_are_one_paragraph(tmp_path, capsys):
    import argparse

    from synco.eval.head import load_head

    nan = _head_file(tmp_path / "nan.pt", bias=torch.full((10,), float("nan")))
    with pytest.raises(SyncoError, match="not finite"):
        load_head(nan)
    flat = _head_file(tmp_path / "flat.pt", weight=torch.zeros(320))
    with pytest.raises(SyncoError, match="weight"):
        load_head(flat)
    torch.save({"weight": torch.zeros(10, 32), "bias": torch.zeros(10), "x": argparse.Namespace(a=1)},
               tmp_path / "pickled.pt")
    with pytest.raises(SyncoError) as e:
        load_head(tmp_path / "pickled.pt")
    assert "weights_only" not in str(e.value) and "trust" not in str(e.value)
    # through the command line: exit 2, and an earlier result is kept
    out = tmp_path / "out"
    out.mkdir()
    (out / "robustness.json").write_text('{"kept": true}')
    rc, err = cli(capsys, "eval", "robustness", "--checkpoint", "random", "--linear-head", nan, "--out", out,
                  "backbone=cpu-demo", *EVAL)
    assert_clean_error(rc, err, "not finite")
    assert json.loads((out / "robustness.json").read_text()) == {"kept": True}


def test_a_diverged_probe_writes_no_head_and_no_result(tmp_path, capsys, monkeypatch, tiny_imagefolder):
    from synco.eval import finetune as ft
    from synco.eval.grid import GridLinear

    args = ["--checkpoint", "random", "backbone=cpu-demo", "dataset=folder", f"root={tiny_imagefolder}",
            "epochs=1", "warmup_epochs=0", "batch_size=6", *EVAL]
    real_state = GridLinear.head_state
    monkeypatch.setattr(GridLinear, "head_state",
                        lambda self, g: {**real_state(self, g), "weight": real_state(self, g)["weight"] * np.nan})
    rc, err = cli(capsys, "eval", "linear", *args, "val_fraction=0", "cache_features=true", "--out", tmp_path / "l")
    assert_clean_error(rc, err, "diverged")
    assert not (tmp_path / "l" / "linear_head.pt").exists() and not (tmp_path / "l" / "linear.json").exists()
    real_forward = ft.FinetuneModel.forward
    monkeypatch.setattr(ft.FinetuneModel, "forward", lambda self, x: real_forward(self, x) * np.nan)
    rc, err = cli(capsys, "eval", "finetune", *args, "--out", tmp_path / "f")
    assert_clean_error(rc, err, "diverged")
    assert not (tmp_path / "f" / "finetune.json").exists()


# ---------------------------------------------------------------------------------------------
# 3. Class folders are matched by name


def test_val_classes_are_matched_by_name(tmp_path, capsys, tiny_imagefolder):
    from synco.eval.common import EvalOptions, eval_datasets

    root = copy_folder(tiny_imagefolder, tmp_path / "data")
    (root / "val" / "indoor").rename(root / "val" / "zzz")
    with pytest.raises(SyncoError, match="zzz"):
        eval_datasets(EvalOptions(dataset="folder", root=str(root)), 16)
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", "random", "backbone=cpu-demo", "dataset=folder",
                  f"root={root}", "--out", tmp_path / "e", *EVAL)
    assert_clean_error(rc, err, "indoor", "zzz")


# ---------------------------------------------------------------------------------------------
# 4. The k-NN feature cache follows the images' contents


def test_knn_cache_follows_the_images_not_their_names(tmp_path, capsys, tiny_imagefolder):
    root = copy_folder(tiny_imagefolder, tmp_path / "data")
    run = one_shot_run(tmp_path / "run", 0)
    args = ["eval", "knn", "--checkpoint", run, "dataset=folder", f"root={root}", "k=[1,5]", *EVAL]
    assert cli(capsys, *args, "--out", tmp_path / "a")[0] == 0
    before = torch.load(tmp_path / "a" / "knn_features.pt", weights_only=True)["test"]
    for i, f in enumerate(sorted((root / "val" / "indoor").iterdir())):  # same names, other pictures
        src = sorted((root / "val" / "space").iterdir())[i]
        f.write_bytes(src.read_bytes())
        os.utime(f, ns=(10**18 + i, 10**18 + i))
    assert cli(capsys, *args, "--out", tmp_path / "a")[0] == 0
    assert cli(capsys, *args, "--out", tmp_path / "fresh")[0] == 0
    again = torch.load(tmp_path / "a" / "knn_features.pt", weights_only=True)["test"]
    fresh = torch.load(tmp_path / "fresh" / "knn_features.pt", weights_only=True)["test"]
    assert not torch.equal(before, fresh)  # the images did change
    assert torch.equal(again, fresh)
    a, b = (json.loads((tmp_path / d / "knn.json").read_text())["results"] for d in ("a", "fresh"))
    assert a == b


# ---------------------------------------------------------------------------------------------
# 7. A linear probe's resume fingerprint follows the weights


def test_linear_probe_resume_follows_the_weights(tmp_path, capsys, tiny_imagefolder):
    run = one_shot_run(tmp_path / "run", 1)
    args = ["eval", "linear", "--checkpoint", run, "dataset=folder", f"root={tiny_imagefolder}", "epochs=2",
            "warmup_epochs=0", "val_fraction=0", "cache_features=true", "batch_size=6", *EVAL]
    assert cli(capsys, *args, "--out", tmp_path / "a")[0] == 0
    first = json.loads((tmp_path / "a" / "linear.json").read_text())
    one_shot_run(run, 2)  # the pretraining went further: same path, new weights
    rc, err = cli(capsys, *args, "--out", tmp_path / "a")
    assert rc == 0, err
    assert cli(capsys, *args, "--out", tmp_path / "fresh")[0] == 0
    again = json.loads((tmp_path / "a" / "linear.json").read_text())
    fresh = json.loads((tmp_path / "fresh" / "linear.json").read_text())
    assert again["history"] == fresh["history"] != first["history"]


# ---------------------------------------------------------------------------------------------
# 8. One lock per eval output folder


def test_eval_refuses_an_out_in_use(tmp_path, capsys):
    out = tmp_path / "e"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".synco.lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        for protocol in ("knn", "linear"):
            rc, err = cli(capsys, "eval", protocol, "--checkpoint", "random", "backbone=cpu-demo", "--out", out,
                          *EVAL)
            assert_clean_error(rc, err, f"PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", "random", "backbone=cpu-demo", "--out", out, "k=[1]",
                  *EVAL)
    assert rc == 0, err  # a dead owner's lock is taken over, and released at the end
    assert not (out / ".synco.lock").exists()


# ---------------------------------------------------------------------------------------------
# 9 and report: rows per resolved run, results validated


def _knn_result(ck: str, top1=50.0):
    return {"protocol": "knn", "checkpoint": ck, "backbone": "vit_tiny", "dataset": "digits",
            "results": {"20": {"top1": top1, "top5": 90.0}}}


def test_report_rows_are_runs_not_relative_paths(tmp_path, monkeypatch, capsys):
    for folder, method, top1 in (("A", "synco", 61.0), ("B", "byol", 52.0)):
        run = tmp_path / folder / "run1"
        (run / "eval").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"method": method}))
        # evaluated from inside its parent folder: the result holds the relative path "run1"
        (run / "eval" / "knn.json").write_text(json.dumps(_knn_result("run1", top1)))
    monkeypatch.chdir(tmp_path)
    from synco.eval.report import create_report

    rows, _ = create_report(["A", "B"])
    got = sorted((r["Method"], r["k-NN k=20"]) for r in rows)
    assert got == [("byol", 52.0), ("synco", 61.0)]
    monkeypatch.chdir(tmp_path / "A")
    rows, _ = create_report(["../B"])
    assert [(r["Method"], r["k-NN k=20"]) for r in rows] == [("byol", 52.0)]


def test_report_refuses_a_result_with_a_non_number(tmp_path, capsys):
    bad = tmp_path / "run" / "eval" / "knn.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(_knn_result("random", top1="abc")))
    rc, err = cli(capsys, "report", tmp_path / "run", "--out", tmp_path / "rep")
    assert_clean_error(rc, err, "knn.json", "top1")
    bad.write_text(json.dumps({**_knn_result("random"), "results": [1, 2]}))
    rc, err = cli(capsys, "report", tmp_path / "run", "--out", tmp_path / "rep")
    assert_clean_error(rc, err, "knn.json")


@pytest.mark.parametrize("top1, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (250.0, "250.0"),
                                         (-5.0, "-5.0")])
def test_report_refuses_a_percentage_that_is_not_one(tmp_path, capsys, top1, shown):
    """NaN / Infinity (json.dumps writes them, json.loads reads them back) and an accuracy outside [0, 100] were
    printed as numbers in the table: refused, naming the file and the key."""
    bad = tmp_path / "run" / "eval" / "knn.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(_knn_result("random", top1=top1)))
    rc, err = cli(capsys, "report", tmp_path / "run", "--out", tmp_path / "rep")
    assert_clean_error(rc, err, "knn.json", "top1", shown)
    assert not (tmp_path / "rep" / "report.md").exists()


def test_report_refuses_a_torn_result_naming_it(tmp_path, capsys):
    """A knn.json cut in half (a killed write) next to a good one: refused naming it (it was skipped with a
    warning and exit 0, a hole in the table that looks like a missing evaluation)."""
    for run in ("a", "b"):
        (tmp_path / run / "eval").mkdir(parents=True)
        (tmp_path / run / "eval" / "knn.json").write_text(json.dumps(_knn_result("random")))
    torn = tmp_path / "b" / "eval" / "knn.json"
    torn.write_text(torn.read_text()[:40])
    rc, err = cli(capsys, "report", tmp_path, "--out", tmp_path / "rep")
    assert_clean_error(rc, err, str(torn))
    assert not (tmp_path / "rep" / "report.md").exists()


def test_report_leaves_efficiency_results_out_of_the_table(tmp_path, capsys):
    """`eval efficiency` results (timings of a method, no checkpoint) beside an evaluated run: one row, the
    run's, and a note, not an empty row with Run '?'."""
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "knn.json").write_text(json.dumps(_knn_result("random", top1=61.0)))
    (tmp_path / "efficiency").mkdir()
    (tmp_path / "efficiency" / "efficiency.json").write_text(json.dumps(
        {"protocol": "efficiency", "preset": "cpu-demo", "backbone": "vit_tiny", "methods": {"moby": {}}}))
    rc, err = cli(capsys, "report", tmp_path, "--out", tmp_path / "rep")
    assert rc == 0, err
    rows = (tmp_path / "rep" / "report.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and "61.0000" in rows[0], rows
    assert "efficiency.json" in err and "left out" in err
    rc, err = cli(capsys, "report", tmp_path / "efficiency", "--out", tmp_path / "rep2")
    assert_clean_error(rc, err, "no result")


# ---------------------------------------------------------------------------------------------
# 10 and sweeps: data.root matters; an unreadable summary is not a finished run


def test_sweep_run_with_another_data_root_is_not_reused(tmp_path):
    from synco.sweep import planning, runner
    from synco.sweep.spec import parse_spec

    assert planning.run_difference_lines({"data": {"root": "/a"}}, {"data": {"root": "/b"}})
    spec = parse_spec({"base": "cpu-demo", "seeds": 1, "axes": {"grid": {"contrast.temperature": [0.2]}}}, "t", "t")
    (run,) = runner.plan(spec, tmp_path)
    run.dir.mkdir(parents=True)
    (run.dir / "config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict()))
    (run.dir / "summary.json").write_text('{"knn_top1": 5')  # torn by a kill
    (run,) = runner.plan(spec, tmp_path)
    assert run.status == "resume"
    (run.dir / "summary.json").write_text('{"knn_top1": 5}')
    (run,) = runner.plan(spec, tmp_path)
    assert run.status == "done"


# ---------------------------------------------------------------------------------------------
# 11. synth-data generate: damaged bookkeeping is refused; live writers' temp files are kept


@pytest.fixture(scope="module")
def tiny_diffusion(tmp_path_factory):
    from synco.synth.diffusion import DiffusionTrainConfig, train_diffusion

    out = tmp_path_factory.mktemp("diffusion") / "model"
    cfg = DiffusionTrainConfig(block_out_channels=[8, 16], attention=[False, True], norm_num_groups=4, batch_size=8,
                               sample_steps=2, preview=False, threads=1, log_every=1, warmup_steps=1, device="cpu",
                               steps=2)
    train_diffusion("digits", out, cfg, progress=False)
    return out


def test_generate_refuses_damaged_bookkeeping(tiny_diffusion, tmp_path):
    from synco.synth.generate import GenerateConfig, generate

    out = tmp_path / "syn"
    generate(str(tiny_diffusion), "0,1", 1, out, GenerateConfig(device="cpu"), progress=False)
    settings = (out / "generation.json").read_text()
    (out / "generation.json").write_text(settings[:20])  # torn
    with pytest.raises(SyncoError, match="generation.json"):
        generate(str(tiny_diffusion), "0,1", 2, out, GenerateConfig(device="cpu", steps=7), progress=False)
    (out / "generation.json").write_text("[1, 2]")
    with pytest.raises(SyncoError, match="generation.json"):
        generate(str(tiny_diffusion), "0,1", 2, out, GenerateConfig(device="cpu"), progress=False)
    (out / "generation.json").unlink()  # gone: the manifest still tells which settings made the images
    with pytest.raises(SyncoError, match="other settings"):
        generate(str(tiny_diffusion), "0,1", 2, out, GenerateConfig(device="cpu", steps=7), progress=False)
    good = (out / "manifest.jsonl").read_text()
    (out / "manifest.jsonl").write_text(json.dumps([json.loads(line) for line in good.splitlines()]) + "\n")
    with pytest.raises(SyncoError, match="manifest.jsonl"):
        generate(str(tiny_diffusion), "0,1", 2, out, GenerateConfig(device="cpu"), progress=False)
    (out / "manifest.jsonl").write_text(good)
    (out / "generation.json").write_text(settings)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / "0" / f".00001.png.tmp{holder.pid}"
        live.write_bytes(b"being written")
        dead = out / "0" / ".00002.png.tmp999999999"
        dead.write_bytes(b"left by a kill")
        figures = generate(str(tiny_diffusion), "0,1", 2, out, GenerateConfig(device="cpu"), progress=False)
        assert figures["generated"] == 2
        assert live.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# Resume files: metrics.jsonl and checkpoints


def test_trim_jsonl_tolerates_torn_and_garbage_lines(tmp_path):
    from synco.engine.metrics import read_jsonl, trim_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n[1, 2]\n{"step": "x"}\nnot json\n{"step": 2, "loss": 2}\n'
                    '{"step": 3, "loss": 1}\n{"step": 4, "lo')
    trim_jsonl(path, 2)
    assert read_jsonl(path) == [{"step": 1, "loss": 3}, {"step": 2, "loss": 2}]
    assert path.read_text().endswith("\n")


@pytest.mark.parametrize("change", [{"step": "10"}, {"epoch": None}, {"model": [1]}, {"config": "x"},
                                    {"global_batch": 1.5}])
def test_checkpoint_with_wrong_types_is_one_paragraph(tmp_path, change):
    from synco.engine.checkpoint import load_training_state

    state = {"version": 1, "model": {}, "optimizer": {"state": {}, "param_groups": []}, "scaler": None, "step": 3,
             "epoch": 0, "batch_in_epoch": 3, "config": {}, "world_size": 1, "global_batch": 32, "rng": {},
             "segments": []}
    torch.save(state, tmp_path / "ok.pt")
    assert load_training_state(tmp_path / "ok.pt")["step"] == 3
    torch.save({**state, **change}, tmp_path / "checkpoint.pt")
    with pytest.raises(SyncoError, match=next(iter(change))):
        load_training_state(tmp_path / "checkpoint.pt")


# ---------------------------------------------------------------------------------------------
# Transfer datasets: metadata, images, splits, ImageNet-v2 on an ImageNet-100 head


def _voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for split in ("trainval", "test"):
        ids = [f"{split[:2]}{i}" for i in range(3)]
        for i, ident in enumerate(ids):
            Image.new("RGB", (12, 10), (40 * i, 0, 0)).save(voc / "JPEGImages" / f"{ident}.jpg")
            (voc / "Annotations" / f"{ident}.xml").write_text(
                f"<annotation><object><name>{['dog', 'cat', 'car'][i]}</name></object></annotation>")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def test_transfer_corrupt_metadata_names_the_file(tmp_path):
    from synco.eval.transfer import create_transfer_split

    voc = _voc(tmp_path)
    xml = voc / "Annotations" / "tr1.xml"
    xml.write_text("<annotation><object><name>cat</na")
    with pytest.raises(SyncoError, match="tr1.xml"):
        create_transfer_split("voc2007", tmp_path)
    xml.write_text("<annotation><object><pose>Left</pose></object></annotation>")
    with pytest.raises(SyncoError, match="tr1.xml"):
        create_transfer_split("voc2007", tmp_path)
    cars = tmp_path / "stanford_cars"
    (cars / "devkit").mkdir(parents=True)
    (cars / "cars_train").mkdir()
    (cars / "cars_test").mkdir()
    for name in ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat"):
        (cars / name).write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(SyncoError, match=r"cars_\w+\.mat"):
        create_transfer_split("cars", tmp_path)


def test_sun397_fallback_split_does_not_depend_on_listing_order(tmp_path):
    import torchvision.datasets as tvd

    from synco.eval.transfer import TransferOptions
    from synco.eval.transfer_data import sun397_split

    sun = tmp_path / "SUN397"
    sun.mkdir()
    (sun / "ClassName.txt").write_text("/a/abbey\n/b/bar\n")
    for cls in ("a/abbey", "b/bar"):
        (sun / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8)).save(sun / cls / f"sun_{cls[-1]}{i}.jpg")
    opts = TransferOptions(sun397_train_per_class=2)

    def split_files(reverse: bool):
        ds = tvd.SUN397(str(tmp_path), download=False)
        order = sorted(range(len(ds._image_files)), key=lambda i: str(ds._image_files[i]), reverse=reverse)
        ds._image_files = [ds._image_files[i] for i in order]
        ds._labels = [ds._labels[i] for i in order]
        train, test = sun397_split(ds, tmp_path, opts.sun397_train_per_class, opts.seed)
        return [sorted(str(b._image_files[j]) for b, j in v.items) for v in (train, test)]

    assert split_files(False) == split_files(True)


def test_imagenet_v2_integer_folders_map_to_an_imagenet100_head():
    from timm.data import ImageNetInfo

    from synco.data.folder import load_class_list
    from synco.eval.classes import class_index_map

    head = load_class_list("imagenet100")
    wnids = list(ImageNetInfo("imagenet-1k").label_names())
    mapping = class_index_map([str(i) for i in range(1000)], head)
    assert len(mapping) == 100
    assert all(head[h] == wnids[int(folder)] for folder, h in mapping.items())


# ---------------------------------------------------------------------------------------------
# OS errors, messages


def test_os_errors_are_one_paragraph(tmp_path, capsys, monkeypatch):
    from synco.cli.main import os_error_message

    for code in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR):
        assert os_error_message(OSError(code, os.strerror(code), "/some/path")) is not None
    long = "a" * 300
    monkeypatch.chdir(tmp_path)
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", long, *EVAL)
    assert_clean_error(rc, err, "too long")
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", "random", "backbone=cpu-demo", "--out", long, *EVAL)
    assert_clean_error(rc, err, "too long")
    (tmp_path / "loop").symlink_to("loop")
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", "random", "backbone=cpu-demo", "--out", "loop/x", *EVAL)
    assert_clean_error(rc, err, "symbolic link")


def test_symlink_loops_in_image_folders_are_followed_once(tmp_path, caplog, tiny_imagefolder):
    from synco.data.folder import SafeImageFolder

    root = copy_folder(tiny_imagefolder / "train", tmp_path / "train")
    counts = {c: len(list((root / c).iterdir())) for c in ("indoor", "outdoor", "space")}
    (root / "indoor" / "up").symlink_to("..")  # back to train/: a loop through every class
    (root / "space" / "self").symlink_to(".")
    (root / "outdoor" / "more").symlink_to(tiny_imagefolder / "val" / "outdoor")  # a real extra folder: listed
    ds = SafeImageFolder(root)
    listed = {c: sum(ds.classes[t] == c for _, t in ds.samples) for c in ds.classes}
    assert listed == {**counts, "outdoor": counts["outdoor"] + 3}
    assert "indoor/up" in caplog.text and "space/self" in caplog.text


def test_bare_safetensors_with_backbone_given(tmp_path, capsys):
    from safetensors.torch import save_file

    _, bb = tiny_backbone(0)
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    rc, err = cli(capsys, "eval", "knn", "--checkpoint", tmp_path / "bare.safetensors", "backbone=cpu-demo",
                  f"{TINY_KW.split('.', 1)[1]}", "--out", tmp_path / "e", "k=[1]", *EVAL)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------
# Robustness: what was asked for must run


def test_robustness_benchmarks_asked_for_must_run(tmp_path, capsys):
    _head_file(tmp_path / "h" / "linear_head.pt", dim=96)  # cpu-demo's features
    out = tmp_path / "out"
    out.mkdir()
    (out / "robustness.json").write_text('{"kept": true}')
    base = ["eval", "robustness", "--checkpoint", "random", "--linear-head", tmp_path / "h", "--out", out,
            "backbone=cpu-demo", *EVAL]
    rc, err = cli(capsys, *base, "benchmarks=[]")
    assert_clean_error(rc, err, "benchmarks")
    rc, err = cli(capsys, *base, "benchmarks=[a]", f"imagenet_a_root={tmp_path / 'missing'}")
    assert_clean_error(rc, err, "imagenet_a_root")
    rc, err = cli(capsys, *base, "benchmarks=[a]")
    assert_clean_error(rc, err, "imagenet_a_root")
    assert json.loads((out / "robustness.json").read_text()) == {"kept": True}
