"""Round three of the adversarial review (benchmarks/cli_adversarial.py, ``--only round3``), the evaluation half:
every bad input, value or place is one paragraph and exit 2, never a traceback, a silently wrong number or a lost
earlier result. CPU, fp32, tiny models and folders."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_reliability_readback import EVAL, TINY_KW, _voc, assert_clean_error, cli, one_shot_run, tiny_backbone

from synco.errors import SyncoError

pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(tmp_path: Path, tiny_imagefolder: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    return root


# ---------------------------------------------------------------------------------------------
# 1. val_fraction that holds out every training image


def test_val_fraction_leaving_nothing_to_train_is_one_paragraph():
    from synco.eval.linear import heldout_split

    targets = [i % 10 for i in range(60)]
    with pytest.raises(SyncoError, match=r"val_fraction.*0\.983"):
        heldout_split(60, 0.99, 0, targets)  # 60 held out: scikit-learn raised its own ValueError
    with pytest.raises(SyncoError, match="val_fraction"):
        heldout_split(2, 0.9, 0, [0, 1])
    tr, va = heldout_split(60, 0.983, 0, targets)  # the largest the message offers still trains on one
    assert len(tr) >= 1 and len(va) >= 1 and len(tr) + len(va) == 60


# ---------------------------------------------------------------------------------------------
# 8. visualize block= outside the model's depth


def test_attention_block_out_of_range_names_the_valid_range():
    from synco.viz.attention import capture_attention

    _, model = tiny_backbone(0)  # a 1-block ViT of 16 px inputs
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    for block in (99, -5, 1):
        with pytest.raises(SyncoError, match=r"'block'.*from 0 to 0"):
            capture_attention(model, x, block=block)
    for block in (0, -1):
        assert capture_attention(model, x, block=block).shape[:2] == (2, 2)


# ---------------------------------------------------------------------------------------------
# 9. a k-NN feature cache with the right key but non-finite features


def test_knn_cache_with_non_finite_features_is_rebuilt(tmp_path, caplog):
    from synco.eval.knn_protocol import _read_cache

    good = {"key": "k", "train": torch.randn(4, 3), "train_labels": torch.arange(4), "test": torch.randn(2, 3),
            "test_labels": torch.arange(2)}
    torch.save(good, tmp_path / "good.pt")
    assert _read_cache(tmp_path / "good.pt", "k") is not None
    for split, value in (("test", float("nan")), ("train", float("inf"))):
        bad = {**good, split: torch.full_like(good[split], value)}
        torch.save(bad, tmp_path / "bad.pt")
        assert _read_cache(tmp_path / "bad.pt", "k") is None
    assert "not finite" in caplog.text


# ---------------------------------------------------------------------------------------------
# 10-11. an unreadable evaluation image stops the evaluation, naming it (never replaced and counted twice)


def test_unreadable_eval_image_stops_knn_naming_it_and_keeps_the_result(tmp_path, capsys, tiny_imagefolder):
    root = _folder(tmp_path, tiny_imagefolder)
    run = one_shot_run(tmp_path / "run", 0)
    out = tmp_path / "out"
    args = ["eval", "knn", "--checkpoint", run, "--out", out, *EVAL, "dataset=folder", f"root={root}", "k=[1]"]
    rc, err = cli(capsys, *args)
    assert rc == 0, err
    before = (out / "knn.json").read_text()
    bad = root / "val" / "space" / "01.jpg"
    bad.write_bytes(b"garbage")
    rc, err = cli(capsys, *args)
    assert_clean_error(rc, err, str(bad), "cannot be read")
    assert (out / "knn.json").read_text() == before


def test_unreadable_eval_image_through_a_worker_is_one_paragraph(tmp_path, tiny_imagefolder):
    from torch._utils import ExceptionWrapper

    from synco.cli.main import user_message
    from synco.data.folder import EvalImageError, SafeImageFolder

    root = _folder(tmp_path, tiny_imagefolder) / "val"
    ds = SafeImageFolder(root, unreadable="error")
    (root / "space" / "00.jpg").write_bytes(b"garbage")
    i = [p for p, _ in ds.samples].index(str(root / "space" / "00.jpg"))
    with pytest.raises(EvalImageError) as own:
        ds[i]
    try:
        ds[i]
    except EvalImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what a DataLoader worker sends back
    with pytest.raises(EvalImageError) as e:
        wrapped.reraise()
    assert user_message(e.value) == str(own.value)
    assert SafeImageFolder(root)[i][1] == ds.samples[i + 1][1]  # training (not strict) still takes the next one


def test_the_knn_of_a_pretraining_run_leaves_an_unreadable_image_out(tmp_path, tiny_imagefolder):
    """Pretraining's k-NN (monitor and end of run) must not stop the run, nor count a neighbour in the unreadable
    image's place: it leaves the image out, as if it were not there, and says how many it left out."""
    from synco.config import load_config
    from synco.data.folder import UNREADABLE, SafeImageFolder
    from synco.eval.knn_protocol import _knn_sets, _Pixels, knn_of

    root = _folder(tmp_path, tiny_imagefolder)
    bad = root / "val" / "space" / "01.jpg"

    def knn():
        cfg = load_config("cpu-demo", ["data.dataset=folder", f"data.root={root}", "data.image_size=16",
                                       "knn.k=[1,3]", "device=cpu", "data.num_workers=0"])
        (train, test), _ = _knn_sets(cfg)
        return knn_of(_Pixels(), train, test, cfg, torch.device("cpu"), progress=False), len(test)

    bad.write_bytes(b"")
    (results, left_out), n_test = knn()
    assert left_out == 1
    i = [p for p, _ in SafeImageFolder(root / "val").samples].index(str(bad))
    assert SafeImageFolder(root / "val", unreadable="exclude")[i][1] == UNREADABLE
    bad.unlink()
    (without, none_left), n_without = knn()
    assert none_left == 0 and n_without == n_test - 1
    assert results == without  # the same numbers as without the file: nothing counted in its place


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_an_evaluation_stopped_in_its_workers_exits(tmp_path, tiny_imagefolder, workers):
    """The workers ignore SIGTERM, and multiprocessing's exit handler terminates, then joins, the daemonic ones an
    error left running: the process printed its error, then never exited. Now it exits 2, without tracebacks of
    the loader's queues. (The timeout only detects a hang: nothing here is timed.)"""
    import subprocess
    import sys

    root = _folder(tmp_path, tiny_imagefolder)
    run = one_shot_run(tmp_path / "run", 0)
    bad = root / "val" / "space" / "01.jpg"
    bad.write_bytes(b"")
    cmd = [sys.executable, "-m", "synco", "eval", "knn", "--checkpoint", str(run), "--out", str(tmp_path / "out"),
           "--no-progress", "device=cpu", "dataset=folder", f"root={root}", "k=[1]", f"num_workers={workers}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(bad) in done.stderr and "Traceback" not in done.stderr


def test_transfer_stops_at_a_missing_or_corrupt_image(tmp_path):
    from synco.eval.transfer import create_transfer_split

    voc = _voc(tmp_path)
    (voc / "JPEGImages" / "tr1.jpg").write_bytes(b"garbage")
    (voc / "JPEGImages" / "te2.jpg").unlink()
    train, test = create_transfer_split("voc2007", tmp_path)
    assert train[0][0].size == (12, 10) and test[1][0].size == (12, 10)
    with pytest.raises(SyncoError, match="tr1.jpg"):
        train[1]
    with pytest.raises(SyncoError, match="te2.jpg"):
        test[2]  # it was replaced by another image and counted twice


# ---------------------------------------------------------------------------------------------
# 12, 34. SUN397 partition files: images missing from disk, paths without the leading '/'


def _sun(root: Path, slash: bool = True) -> Path:
    sun = root / "SUN397"
    (sun / "ClassName.txt").parent.mkdir(parents=True)
    (sun / "ClassName.txt").write_text("/a/abbey\n/b/bar\n")
    train, test = [], []
    for cls in ("a/abbey", "b/bar"):
        (sun / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8)).save(sun / cls / f"sun_{i}.jpg")
            (train if i < 3 else test).append(("/" if slash else "") + f"{cls}/sun_{i}.jpg")
    (sun / "Training_01.txt").write_text("\n".join(train) + "\n")
    (sun / "Testing_01.txt").write_text("\r\n".join(test) + "\r\n")
    return sun


def _sun_split(root: Path):
    import torchvision.datasets as tvd

    from synco.eval.transfer import TransferOptions
    from synco.eval.transfer_data import sun397_split

    train, test = sun397_split(tvd.SUN397(str(root), download=False), root, TransferOptions().sun397_train_per_class, 0)
    return [sorted(Path(b._image_files[j]).relative_to(root).as_posix() for b, j in v.items) for v in (train, test)]


def test_sun397_partition_paths_with_or_without_leading_slash(tmp_path):
    _sun(tmp_path / "slash")
    _sun(tmp_path / "noslash", slash=False)
    train, test = _sun_split(tmp_path / "slash")
    assert len(train) == 6 and len(test) == 6
    assert _sun_split(tmp_path / "noslash") == [train, test]  # was: both empty, "a dataset split is empty"


def test_sun397_images_missing_from_disk_are_named(tmp_path):
    sun = _sun(tmp_path)
    (sun / "a/abbey/sun_0.jpg").unlink()
    (sun / "a/abbey/sun_1.jpg").unlink()
    with pytest.raises(SyncoError, match=r"SUN397: 2 of the 6 .*Training_01\.txt.*sun_0\.jpg, a/abbey/sun_1\.jpg"):
        _sun_split(tmp_path)  # was: trained on 4 of 6 without a word


# ---------------------------------------------------------------------------------------------
# 13-14. a linear head is only used on the weights it was trained on


def test_linear_head_on_other_weights_is_refused(tmp_path, capsys, tiny_imagefolder):
    from synco.eval.common import EvalOptions, load_eval_backbone, weights_digest
    from synco.eval.head import load_classifier

    root = _folder(tmp_path, tiny_imagefolder)
    run_a, run_b = one_shot_run(tmp_path / "a", 0), one_shot_run(tmp_path / "b", 5)
    data = ["dataset=folder", f"root={root}"]
    rc, err = cli(capsys, "eval", "linear", "--checkpoint", run_a, "--out", tmp_path / "lin", *EVAL, *data, "epochs=1",
                  "warmup_epochs=0", "cache_features=true")
    assert rc == 0, err
    head = tmp_path / "lin" / "linear_head.pt"
    opts = EvalOptions(device="cpu")
    backbone_a, _ = load_eval_backbone(str(run_a), opts, torch.device("cpu"))
    assert torch.load(head, weights_only=True)["backbone_weights"] == weights_digest(backbone_a)
    load_classifier(str(run_a), str(head), opts, torch.device("cpu"))  # its own weights: accepted
    for protocol, extra in (("robustness", ["benchmarks=[clean]"]), ("adversarial", ["--attacks", "fgsm"])):
        out = tmp_path / protocol
        out.mkdir()
        (out / f"{protocol}.json").write_text('{"kept": true}')
        rc, err = cli(capsys, "eval", protocol, "--checkpoint", run_b, "--linear-head", head, "--out", out, *EVAL,
                      *data, *extra)
        assert_clean_error(rc, err, "linear head", str(head), str(run_b))
        assert json.loads((out / f"{protocol}.json").read_text()) == {"kept": True}
    # a head written before the hash was recorded: accepted, with a warning
    state = torch.load(head, weights_only=True)
    del state["backbone_weights"]
    torch.save(state, tmp_path / "old_head.pt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_classifier(str(run_b), str(tmp_path / "old_head.pt"), opts, torch.device("cpu"))
    assert any("does not record" in str(w.message) for w in seen)


# ---------------------------------------------------------------------------------------------
# 15. a benchmark named in benchmarks= that cannot run is an error, and the earlier robustness.json stays


@pytest.mark.filterwarnings("ignore:the linear head")  # an unhashed head: its warning is tested above
def test_robustness_asked_benchmark_that_cannot_run_keeps_the_earlier_result(tmp_path, capsys, tiny_imagefolder):
    from synco.eval.head import LinearHead, save_head

    save_head(LinearHead(96, 10), tmp_path / "linear_head.pt", [str(d) for d in range(10)], {}, 32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "robustness.json").write_text('{"kept": true}')
    rc, err = cli(capsys, "eval", "robustness", "--checkpoint", "random", "--linear-head", tmp_path / "linear_head.pt",
                  "--out", out, "backbone=cpu-demo", *EVAL, "dataset=folder", f"root={tiny_imagefolder}",
                  "benchmarks=[clean]")
    assert_clean_error(rc, err, "benchmarks=['clean']", "classes")  # was: skipped, exit 0, an empty result
    assert json.loads((out / "robustness.json").read_text()) == {"kept": True}


# ---------------------------------------------------------------------------------------------
# 16. a flag and a key=value for the same option that disagree


def test_flag_and_key_value_that_disagree_are_refused(tmp_path, capsys):
    rc, err = cli(capsys, "eval", "efficiency", "--out", tmp_path / "e", "--steps", "2", "steps=3", "--methods",
                  "moby", "device=cpu", "warmup_steps=0", TINY_KW)
    assert_clean_error(rc, err, "--steps", "steps=3")  # was: 2 steps measured, steps=3 ignored
    assert not (tmp_path / "e" / "efficiency.json").exists()
    from synco.cli.eval_robust import take_flag
    from synco.eval.efficiency import EfficiencyOptions

    opts = EfficiencyOptions(steps=2, methods=["moby"])
    take_flag(opts, ["steps=2"], "steps", "--steps", 2)  # the same value twice: fine
    take_flag(opts, [], "steps", "--steps", 4)  # the flag alone
    take_flag(opts, ["methods=[moby]"], "methods", "--methods", ["moby"])
    assert opts.steps == 4
    with pytest.raises(SyncoError, match="--methods"):
        take_flag(opts, ["methods=[moby]"], "methods", "--methods", ["byol"])
    rc, err = cli(capsys, "eval", "adversarial", "--checkpoint", "random", "--linear-head", tmp_path / "none.pt",
                  "--out", tmp_path / "adv", "backbone=cpu-demo", *EVAL, "--max-images", "8", "max_images=9")
    assert_clean_error(rc, err, "--max-images", "max_images=9")


# ---------------------------------------------------------------------------------------------
# 31. a class list saved by Windows Notepad


def test_class_list_with_byte_order_mark_and_crlf(tmp_path):
    from synco.data.folder import load_class_list

    path = tmp_path / "classes.txt"
    path.write_bytes(b"\xef\xbb\xbf0\r\n1\r\n2 # two\r\n")
    assert load_class_list(path) == ["0", "1", "2"]  # was: '\ufeff0', a class "missing" from the folder
    path.write_bytes(b"caf\xe9\n")  # Latin-1
    with pytest.raises(SyncoError, match="UTF-8"):
        load_class_list(path)


# ---------------------------------------------------------------------------------------------
# 32. resuming a fine-tuning from a checkpoint holding NaN weights names the file


def test_finetune_resume_from_nan_weights_names_the_file(tmp_path, capsys, tiny_imagefolder):
    root = _folder(tmp_path, tiny_imagefolder)
    run = one_shot_run(tmp_path / "run", 0)
    out = tmp_path / "ft"
    args = ["eval", "finetune", "--checkpoint", run, "--out", out, *EVAL, "epochs=2", "warmup_epochs=0",
            "batch_size=8", "dataset=folder", f"root={root}"]
    rc, err = cli(capsys, *args)
    assert rc == 0, err
    state = torch.load(out / "finetune_ckpt.pt", weights_only=True)
    state["epoch"], state["history"], state["step"] = 1, state["history"][:1], state["step"] // 2
    for v in state["model"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, out / "finetune_ckpt.pt")
    (out / "finetune.json").unlink()
    rc, err = cli(capsys, *args)
    assert_clean_error(rc, err, str(out / "finetune_ckpt.pt"), "not finite")  # was: "diverged ... lower lr"
