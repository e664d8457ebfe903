"""Syn2Co synthetic data: a tiny diffusion model trains, generates a resumable ImageFolder clone with a
manifest, pretraining reads it, fidelity scores it; DiT class ids; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from synco.cli.main import main
from synco.errors import SyncoError
from synco.synth import diffusion
from synco.synth.backends import imagenet_class_ids, imagenet_wnids
from synco.synth.diffusion import DiffusionTrainConfig, train_diffusion
from synco.synth.generate import GenerateConfig, generate, parse_classes
from synco.synth.model import MODEL_FILE, image_seed, load_model, write_preview

# A UNet small enough to train a few steps in well under a second.
# device=cpu: with a GPU visible, auto would train and sample there, and this file tests the CPU path.
TINY = dict(block_out_channels=[8, 16], attention=[False, True], norm_num_groups=4, batch_size=8,
            sample_steps=2, preview=False, threads=1, log_every=1, warmup_steps=1, device="cpu")


def tiny_cfg(**kw) -> DiffusionTrainConfig:
    return DiffusionTrainConfig(**{**TINY, "steps": 3, **kw})


def gen_config(**kw) -> GenerateConfig:
    return GenerateConfig(device="cpu", **kw)  # the CPU path, GPU or not


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion") / "model"
    train_diffusion("digits", out, tiny_cfg(p_uncond=0.5), progress=False)
    return out


def files_in(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent != root)


def manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- training


def test_train_saves_a_diffusers_model_that_loads(tiny_model):
    for f in ("unet/config.json", "scheduler/scheduler_config.json", "synco_diffusion.json", "train_log.jsonl"):
        assert (tiny_model / f).is_file(), f
    meta = json.loads((tiny_model / "synco_diffusion.json").read_text())
    assert meta["classes"] == [str(d) for d in range(10)] and meta["null_class"] == 10
    assert (meta["image_size"], meta["channels"], meta["resolution"], meta["train_steps"]) == (8, 1, 16, 3)
    m = load_model(tiny_model)
    assert type(m.unet).__name__ == "UNet2DModel" and m.unet.config.num_class_embeds == 11
    assert type(m.scheduler).__name__ == "DDPMScheduler"
    x = m.sample([0, 9], [1, 2])
    assert x.shape == (2, 1, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_cli_trains_on_an_image_folder(digits_folder, tmp_path, capsys):
    out = tmp_path / "m"
    opts = [f"{k}={json.dumps(v)}" for k, v in {**TINY, "steps": 2, "image_size": 8}.items()]
    assert main(["synth-data", "train", "--data", str(digits_folder), "--out", str(out), "--no-progress", *opts]) == 0
    meta = json.loads((out / "synco_diffusion.json").read_text())
    assert meta["classes"] == [str(d) for d in range(10)] and (meta["channels"], meta["resolution"]) == (3, 8)
    assert load_model(out).sample([2], [0]).shape == (1, 3, 8, 8)
    capsys.readouterr()
    assert main(["synth-data", "train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "neither 'digits' nor an existing directory" in capsys.readouterr().err


def test_samples_in_the_training_process_match_the_saved_model(tmp_path):
    """The preview drawn right after training equals one drawn from the reloaded model (same schedule keys)."""
    train_diffusion("digits", tmp_path / "m", tiny_cfg(preview=True), progress=False)
    write_preview(load_model(tmp_path / "m"), tmp_path / "again.png")
    assert (tmp_path / "m" / "preview.png").read_bytes() == (tmp_path / "again.png").read_bytes()


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = tiny_cfg(steps=4, ckpt_every=2)
    train_diffusion("digits", tmp_path / "once", cfg, progress=False)

    real = diffusion._step_generator

    def die_at_3(seed, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(seed, step)

    monkeypatch.setattr(diffusion, "_step_generator", die_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion("digits", tmp_path / "twice", cfg, progress=False)
    assert (tmp_path / "twice" / diffusion.STATE_FILE).is_file() and not (tmp_path / "twice" / MODEL_FILE).exists()
    monkeypatch.setattr(diffusion, "_step_generator", real)
    with pytest.raises(SyncoError, match="different settings"):
        train_diffusion("digits", tmp_path / "twice", tiny_cfg(steps=4, ckpt_every=2, lr=0.5), progress=False)
    train_diffusion("digits", tmp_path / "twice", cfg, progress=False)
    assert not (tmp_path / "twice" / diffusion.STATE_FILE).exists()
    log = [json.loads(line)["step"] for line in (tmp_path / "twice" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]  # step 3, logged before the kill but after the last saved state, is not repeated
    a, b = load_model(tmp_path / "once").unet.state_dict(), load_model(tmp_path / "twice").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SyncoError, match="already holds a trained model"):
        train_diffusion("digits", tmp_path / "once", cfg, progress=False)


def test_image_depends_on_its_seed_only_not_on_the_batch(tiny_model):
    m = load_model(tiny_model)
    for sampler in ("ddpm", "dpm"):  # ddpm draws fresh noise at every step: per-image generators there too
        batch = m.sample([3, 5, 7], [11, 22, 33], sampler=sampler, steps=3, guidance=2.0)
        alone = m.sample([5], [22], sampler=sampler, steps=3, guidance=2.0)
        torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
        assert not torch.allclose(batch[0], batch[2])
    assert image_seed(0, "3", 5) == image_seed(0, "3", 5) != image_seed(0, "3", 6) != image_seed(1, "3", 5)


# ---------------------------------------------------------------- generation


def test_generate_clone_then_pretrain_reads_it(tiny_model, tmp_path, tiny_overrides):
    syn = tmp_path / "synthetic"
    figures = generate(str(tiny_model), "all", 3, syn, gen_config(batch_size=7, seed=5), progress=False)
    assert figures["generated"] == 30 and figures["skipped"] == 0 and figures["images_per_second"] > 0
    assert files_in(syn) == sorted(f"{c}/{i:05d}.png" for c in "0123456789" for i in range(3))
    with Image.open(syn / "4" / "00002.png") as im:
        assert im.size == (16, 16)
    entries = manifest(syn)
    assert len(entries) == 30 and len({e["file"] for e in entries}) == 30
    e = next(e for e in entries if e["file"] == "4/00002.png")
    assert (e["class"], e["class_id"], e["index"], e["seed"]) == ("4", 4, 2, image_seed(5, "4", 2))
    assert (e["sampler"], e["steps"], e["guidance"]) == ("dpm", 2, 2.0) and e["model"] == str(tiny_model.resolve())
    settings = json.loads((syn / "generation.json").read_text())
    assert settings["status"] == "complete" and settings["per_class"] == 3

    run = tmp_path / "run"
    over = [o for o in tiny_overrides if not o.startswith(("epochs=", "data.max_images"))]
    rc = main(["pretrain", "--no-progress", "--out", str(run), *over, "epochs=1", "data.max_images=64",
               f"data.synthetic_root={syn}", "data.synthetic_ratio=0.5"])
    assert rc == 0
    ends = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in ends if r.get("epoch_end")]
    assert [(r["real_images"], r["synthetic_images"]) for r in ends] == [(32, 32)]


def test_resume_after_a_kill_neither_duplicates_nor_corrupts(tiny_model, tmp_path):
    out = tmp_path / "syn"
    cfg = gen_config(batch_size=4)
    generate(str(tiny_model), "0,1,2", 4, out, cfg, progress=False)
    reference = {f: (out / f).read_bytes() for f in files_in(out)}
    # Simulate a kill: a half-written temporary file, two images lost, a manifest line cut short, and one
    # image written whose manifest line never made it.
    (out / "1" / ".00003.png.tmp999999999").write_bytes(b"\x89PNG half")  # its writer (no such PID) is gone
    (out / "0" / "00001.png").unlink()
    (out / "2" / "00003.png").unlink()
    lines = (out / "manifest.jsonl").read_text().splitlines()
    dropped = next(line for line in lines if json.loads(line)["file"] == "1/00002.png")
    kept = [line for line in lines if line != dropped]
    (out / "manifest.jsonl").write_text("\n".join(kept) + "\n" + kept[0][:20])
    figures = generate(str(tiny_model), "0,1,2", 4, out, gen_config(batch_size=3), progress=False)
    assert (figures["generated"], figures["skipped"]) == (2, 10)
    assert files_in(out) == sorted(reference)  # no temp files, nothing extra
    assert {f: (out / f).read_bytes() for f in files_in(out)} == reference  # same seeds -> same images
    entries = manifest(out)
    assert sorted(e["file"] for e in entries) == sorted(reference)  # one entry per image, no duplicates
    # Extending per-class keeps what is there; other settings are refused.
    figures = generate(str(tiny_model), "0,1,2", 5, out, gen_config(batch_size=8), progress=False)
    assert (figures["generated"], figures["skipped"]) == (3, 12) and len(manifest(out)) == 15
    with pytest.raises(SyncoError, match="other settings"):
        generate(str(tiny_model), "0,1,2", 5, out, gen_config(steps=7), progress=False)


def test_cli_generate_and_fidelity(tiny_model, tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["synth-data", "generate", "--model", str(tiny_model), "--classes", "1,7", "--per-class", "2",
               "--out", str(out), "--no-progress", "sampler=ddim", "steps=2", "guidance=1.5", "seed=3",
               "device=cpu"])
    assert rc == 0 and files_in(out) == ["1/00000.png", "1/00001.png", "7/00000.png", "7/00001.png"]
    assert {(e["sampler"], e["guidance"], e["seed"]) for e in manifest(out) if e["file"] == "7/00001.png"} == \
        {("ddim", 1.5, image_seed(3, "7", 1))}
    assert main(["synth-data", "fidelity", "--synthetic", str(out), "--classifier", "svm"]) == 0
    report = json.loads((out / "fidelity.json").read_text())
    assert set(report["per_class"]) == {"1", "7"} and report["n_synthetic"] == 4
    assert report["real_test_accuracy"] > 0.8  # the classifier itself reads real digits
    assert "| 7 | 2 |" in (out / "fidelity.md").read_text()
    capsys.readouterr()
    assert main(["synth-data", "generate", "--model", str(tiny_model), "--per-class", "1", "--out",
                 str(tmp_path / "x"), "--classes", "1,x", "device=cpu"]) == 2
    assert "not trained on class(es) x" in capsys.readouterr().err


def test_fidelity_of_real_digits_is_high(tmp_path):
    from synco.data.digits import export_digits_imagefolder
    from synco.synth.fidelity import fidelity

    export_digits_imagefolder(tmp_path, "test", image_size=16, per_class=5)
    r = fidelity(tmp_path)
    assert r["size"] == 16 and r["n_synthetic"] == 50 and r["synthetic_accuracy"] >= 0.9
    assert r["per_class"]["3"]["n_synthetic"] == 5 and r["real_test_accuracy"] > 0.95


# ---------------------------------------------------------------- pipelines, classes, errors


def test_imagenet_wnid_to_class_id():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    ids = imagenet_class_ids(["n01440764", "n01443537", "n02123045", "n09472597", "n15075141"])
    # tench 0, goldfish 1, tabby cat 281, volcano 980, toilet tissue 999
    assert ids == {"n01440764": 0, "n01443537": 1, "n02123045": 281, "n09472597": 980, "n15075141": 999}
    assert all(w in ids or w in wnids for w in parse_classes("imagenet100"))
    assert len(imagenet_class_ids(parse_classes("imagenet100"))) == 100
    with pytest.raises(SyncoError, match="not ImageNet-1k wnids"):
        imagenet_class_ids(["n00000000"])


def test_missing_model_says_how_to_get_weights(tmp_path, capsys):
    with pytest.raises(SyncoError, match="huggingface-cli download facebook/DiT-XL-2-256"):
        generate(str(tmp_path / "nope"), "imagenet100", 1, tmp_path / "out", progress=False)
    # A hub id that is not in the (empty) cache: no download, and the message names that id.
    rc = main(["synth-data", "generate", "--model", "facebook/DiT-XL-2-512", "--classes", "n01440764",
               "--per-class", "1", "--out", str(tmp_path / "out"), f"cache_dir={tmp_path / 'hf'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "huggingface-cli download facebook/DiT-XL-2-512" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SyncoError, match="model_index.json"):
        generate(str(tmp_path / "empty"), "all", 1, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_local_class_conditional_pipeline(tmp_path):
    """A (randomly initialised, tiny) DiTPipeline saved locally generates with wnid -> ImageNet id mapping."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "dit")
    out = tmp_path / "syn"
    figures = generate(str(tmp_path / "dit"), "n01440764,n02123045", 1, out,
                       gen_config(steps=2, guidance=2.0, resolution=8), progress=False)
    assert figures["generated"] == 2 and files_in(out) == ["n01440764/00000.png", "n02123045/00000.png"]
    entries = {e["class"]: e for e in manifest(out)}
    assert entries["n02123045"]["class_id"] == 281 and entries["n01440764"]["class_id"] == 0
    assert entries["n01440764"]["sampler"] == "DDIMScheduler" and entries["n01440764"]["steps"] == 2
    with Image.open(out / "n02123045" / "00000.png") as im:
        assert im.size == (8, 8) and im.mode == "RGB"


def test_syn2co_presets():
    from synco.config import load_config

    d = load_config("syn2co-digits")
    base = load_config("cpu-demo")
    assert (d.data.synthetic_root, d.data.synthetic_ratio, d.data.synthetic_mode) == ("synthetic/digits", 0.5, "replace")
    assert d.model == base.model and d.epochs == base.epochs and d.data.image_size == 16
    for arch, backbone in (("deit-s", "deit_small_patch16_224"), ("swin-t", "swin_tiny_patch4_window7_224")):
        c = load_config(f"syn2co-imagenet100-{arch}", ["data.root=/data"])
        assert c.data.dataset == "imagenet100" and c.model.backbone == backbone and c.method == "synco"
        assert (c.data.synthetic_root, c.data.synthetic_ratio, c.data.synthetic_mode) == \
            ("synthetic/imagenet100", 0.5, "add")
        assert c.epochs == 300 and c.negatives.cooldown_epochs == 100


# ---------------------------------------------------------------- --out: checked first, one command at a time


def _synth_argv(command: str, out: Path, model: Path, synthetic: Path) -> list[str]:
    if command == "train":
        return ["synth-data", "train", "--data", "digits", "--out", str(out), "steps=1", "device=cpu"]
    if command == "generate":
        return ["synth-data", "generate", "--model", str(model), "--classes", "0", "--per-class", "1", "--out",
                str(out), "device=cpu"]
    return ["synth-data", "fidelity", "--synthetic", str(synthetic), "--out", str(out)]


@pytest.mark.parametrize("command", ["train", "generate", "fidelity"])
def test_out_is_checked_before_any_work(command, tiny_model, tmp_path, capsys, monkeypatch):
    """An existing file or a place under /proc as --out: one clear error before the data, the model or the
    fidelity classifier is touched (fidelity used to train its classifier first, then fail with a traceback)."""
    from synco.synth import fidelity, generate as generate_module

    def no_work(*a, **k):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(diffusion, "load_training_data", no_work)
    monkeypatch.setattr(generate_module, "load_backend", no_work)
    monkeypatch.setattr(fidelity, "fidelity", no_work)
    (tmp_path / "afile").write_text("x")
    synthetic = tmp_path / "syn" / "0"
    synthetic.mkdir(parents=True)
    for out, needle in ((tmp_path / "afile", "afile"), (Path("/proc/synco-test"), "/proc")):
        rc = main(_synth_argv(command, out, tiny_model, synthetic.parent))
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and "synco: error:" in err and needle in err, err


def test_two_generates_on_one_out_are_refused_naming_the_holder(tiny_model, tmp_path, capsys):
    """A generate holds its --out for its whole run: a second one with the same settings is refused (it would
    rewrite generation.json and the manifest under the first) and names the holder's command and PID."""
    import subprocess
    import sys

    out = tmp_path / "syn"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from synco.io import DirLock; "
                               f"DirLock({str(out)!r}, 'synth-data generate').acquire(); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # a handshake, not a sleep
        rc = main(_synth_argv("generate", out, tiny_model, out))
        err = capsys.readouterr().err
        assert rc == 2 and "in use by another synco synth-data generate" in err and str(holder.pid) in err, err
        assert not (out / "manifest.jsonl").exists() and not (out / "generation.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(_synth_argv("generate", out, tiny_model, out)) == 0  # the holder is gone: the lock is taken over
    assert not (out / ".synco.lock").exists()
