"""One validation layer for every command's options (synco.options): the override engine's types, the declared
bounds, the owner named in every error, and one or two cases per command through the real command line (exit 2,
one paragraph, no traceback) before any work is done."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import pytest
import yaml

from synco.cli.main import main
from synco.config import Config, load_config
from synco.errors import SyncoError
from synco.options import apply_overrides, check_options, layer_overrides, opt

CPU = ["device=cpu"]
RANDOM = ["--checkpoint", "random", "backbone=cpu-demo", "device=cpu", "num_workers=0", "--no-progress"]


def error_of(capsys, *argv) -> str:
    """The command's one-paragraph error (exit 2, no traceback), in this process."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("WARNING")]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("synco: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The layer on numbers


@dataclass
class Inner:
    rate: float = opt(0.5, ge=0, lt=1)


@dataclass
class Opts:
    lrs: list[float] = opt(factory=lambda: [0.1], nonempty=True, gt=0)
    ks: list[int] = opt(factory=lambda: [1], ge=1)
    size: int = opt(8, ge=1, le=64, why="a reason")
    mode: str = opt("a", choices=("a", "b"))
    pair: list[float] = opt(factory=lambda: [0.0, 1.0], length=2)
    clip: Optional[float] = opt(None, gt=0)
    kwargs: dict = None
    inner: Inner = None

    def __post_init__(self):
        self.kwargs, self.inner = self.kwargs or {}, self.inner or Inner()


def test_list_elements_take_their_declared_type_with_scientific_notation():
    o = apply_overrides(Opts(), ["lrs=[1e-1, 2, 1.5e3, 3.0e+2]", "ks=[1e1, 3]", "size=6.4e1", "clip=1e-3"])
    assert o.lrs == [0.1, 2.0, 1500.0, 300.0] and all(isinstance(v, float) for v in o.lrs)
    assert o.ks == [10, 3] and o.size == 64 and o.clip == 0.001
    for bad, needle in [("lrs=[a]", "must be a list of numbers"), ("lrs=[true]", "must be a list of numbers"),
                        ("lrs=[nan]", "must be a list of numbers"), ("ks=[1.5]", "must be a list of integers"),
                        ("size=1.5e0", "expects an integer"), ("size=true", "expects an integer"),
                        ("lrs=0.1", "expects a list")]:
        with pytest.raises(SyncoError, match=needle):
            apply_overrides(Opts(), [bad])


@pytest.mark.parametrize("override, needle", [
    ("lrs=[.inf]", "option 'lrs': must be a finite number"),
    ("clip=.nan", "option 'clip': must be a finite number"),
    ("kwargs={a: .nan}", "option 'kwargs': must be a finite number"),
    ("inner.rate=.nan", "option 'inner.rate': must be a finite number"),
    ("lrs=[]", "option 'lrs': must not be an empty list"),
    ("lrs=[0.1, -1]", "option 'lrs': every value must be > 0, got [0.1, -1.0]"),
    ("ks=[0]", "option 'ks': every value must be >= 1"),
    ("size=100", "option 'size': must be in [1, 64], got 100 (a reason)."),
    ("mode=c", "option 'mode': must be one of a, b, got 'c'"),
    ("pair=[1]", "option 'pair': must be a list of 2 values"),
    ("clip=0", "option 'clip': must be > 0"),
    ("inner.rate=1", "option 'inner.rate': must be in [0, 1)"),
])
def test_bounds_are_checked_and_named(override, needle):
    o = apply_overrides(Opts(), [override])
    with pytest.raises(SyncoError) as e:
        check_options(o)
    assert needle in str(e.value)


def test_errors_name_the_owner_of_the_key():
    from synco.eval.linear import LinearOptions
    from synco.synth.diffusion import DiffusionTrainConfig
    from synco.synth.generate import GenerateConfig

    with pytest.raises(SyncoError, match="unknown option 'lrr'"):
        apply_overrides(LinearOptions(), ["lrr=1"])
    with pytest.raises(SyncoError, match="unknown config key 'optim.lrr'"):
        apply_overrides(Config(), ["optim.lrr=1"])
    with pytest.raises(SyncoError, match="^synth-data train option 'lr' expects a number"):
        apply_overrides(DiffusionTrainConfig(), ["lr=fast"])
    with pytest.raises(SyncoError, match="^synth-data generate option 'quality': must be in \\[1, 100\\]"):
        check_options(apply_overrides(GenerateConfig(), ["quality=0"]))
    with pytest.raises(SyncoError, match="^config key 'seed': must be in \\[0, 2\\^63\\)"):
        load_config("cpu-demo", CPU + ["seed=-1"])


def test_shipped_defaults_and_sweep_specs_pass_their_own_checks(tmp_path):
    from synco.eval.adversarial import AdversarialOptions
    from synco.eval.efficiency import EfficiencyOptions
    from synco.eval.finetune import FinetuneOptions
    from synco.eval.knn_protocol import KnnOptions
    from synco.eval.linear import LinearOptions
    from synco.eval.robustness import RobustnessOptions
    from synco.eval.transfer import TransferOptions
    from synco.synth.diffusion import DiffusionTrainConfig
    from synco.synth.generate import GenerateConfig
    from synco.viz.compare import VizOptions

    for cls in (AdversarialOptions, EfficiencyOptions, FinetuneOptions, KnnOptions, LinearOptions,
                RobustnessOptions, TransferOptions, DiffusionTrainConfig, GenerateConfig, VizOptions, Config):
        check_options(cls())
    from synco.sweep import runner
    from synco.sweep.spec import load_spec, spec_names

    for name in spec_names():
        spec = load_spec(name)
        extra = [f"data.root={tmp_path}"] if "imagenet100" in name else []
        extra += [f"data.synthetic_root={tmp_path}"] if "syn2co" in name else []
        runs = runner.plan(spec, tmp_path / name, extra, launcher="slurm" if "imagenet100" in name else "local")
        runner.check_linear_options(spec, runs)


# ---------------------------------------------------------------------------------------------
# pretrain: sizes, seeds, config files


@pytest.mark.parametrize("override, key", [
    ("contrast.queue_size=1000000000000", "contrast.queue_size"),
    ("model.proj_hidden=100000000000", "model.proj_hidden"),
])
def test_huge_sizes_are_refused_before_any_allocation(tmp_path, capsys, override, key):
    line = error_of(capsys, "pretrain", "--out", tmp_path / "r", *CPU, override)
    assert f"config key '{key}': must be in [1, " in line


def test_huge_image_size_is_refused(tmp_path, capsys):
    line = error_of(capsys, "pretrain", "--out", tmp_path / "r", *CPU, "data.image_size=100000",
                    "model.backbone_kwargs={img_size: 100000, patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}")
    assert "config key 'data.image_size': must be in [8, 4096]" in line


def test_memory_estimate_names_the_largest_part():
    from synco.config import check_memory

    cfg = load_config("cpu-demo", CPU)  # then sizes that this machine's memory may not hold
    cfg.contrast.queue_size, cfg.model.proj_dim = 65536, 65536
    check_memory(cfg, physical=64 * 2**30)  # 32 GiB of queues fit 64 GiB
    with pytest.raises(SyncoError, match="config key 'contrast.queue_size': this config needs at least 33.6 GiB"):
        check_memory(cfg, physical=16 * 2**30)


def test_absurd_thread_count_is_refused_and_leaves_no_lock(tmp_path, capsys):
    line = error_of(capsys, "pretrain", "--out", tmp_path / "r", *CPU, "threads=100000")
    assert "config key 'threads': must be in [0, 1024]" in line
    assert not (tmp_path / "r" / ".synco.lock").exists()


def test_largest_seed_trains(tmp_path, capsys, tiny_overrides):
    """seed * 7919 overflowed torch's 64-bit seed above seed ~2.3e15, inside the documented [0, 2^63)."""
    out = tmp_path / "r"
    assert main(["pretrain", "--no-progress", "--out", str(out), *layer_overrides(tiny_overrides, ["epochs=1", "data.max_images=64",
                 "seed=9223372036854775807"])]) == 0, capsys.readouterr().err
    assert (out / "summary.json").exists()


def test_small_seeds_keep_their_epoch_streams():
    """Committed results use seeds 0-4: their per-epoch seeds are what they were (modulo 2^31 then)."""
    from synco.engine.train import epoch_seed

    for seed in (0, 1, 4, 2146):
        cfg = load_config("cpu-demo", CPU + [f"seed={seed}"])
        for rank, epoch in ((0, 0), (1, 59), (7, 299)):
            assert epoch_seed(cfg, rank, epoch) == (seed * 1_000_003 + rank * 10_007 + epoch * 101) % 2**31
    big = [load_config("cpu-demo", CPU + [f"seed={s}"]) for s in (5, 5 + 2**31)]
    assert epoch_seed(big[0], 0, 3) != epoch_seed(big[1], 0, 3)  # seeds 2^31 apart no longer share streams


@pytest.mark.parametrize("content, needle", [
    ("base: 5\n", "'base' must be the name of a preset or the path of a YAML file, got 5"),
    ("base: [cpu-demo]\n", "'base' must be the name of a preset or the path of a YAML file, got ['cpu-demo']"),
    (b"\xff\xfe\x00\x81 binary", "is not a text YAML file"),
])
def test_bad_config_files_are_one_paragraph(tmp_path, capsys, content, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert needle in error_of(capsys, "pretrain", "--config", path, "--out", tmp_path / "r")


def test_config_naming_a_folder_says_so(tmp_path, capsys):
    line = error_of(capsys, "pretrain", "--config", tmp_path, "--out", tmp_path / "r")
    assert "is a folder" in line and "config.yaml" in line


# ---------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("protocol, override, key", [
    ("linear", "lrs=[.inf]", "lrs"),
    ("linear", "weight_decay=.nan", "weight_decay"),
    ("linear", "seed=-1", "seed"),
    ("finetune", "lr=.nan", "lr"),
    ("finetune", "lr=.inf", "lr"),
    ("finetune", "clip_grad=.nan", "clip_grad"),
    ("knn", "batch_size=0", "batch_size"),
    ("knn", "batch_size=-5", "batch_size"),
    ("knn", "num_workers=-1", "num_workers"),
])
def test_eval_options_are_checked_before_any_work(tmp_path, capsys, protocol, override, key):
    # epochs=1 etc.: where an old version accepted the value, it trained briefly and exited 0
    quick = {"linear": ["epochs=1", "warmup_epochs=0", "cache_features=true"],
             "finetune": ["epochs=1", "warmup_epochs=0"], "knn": ["cache=false"]}[protocol]
    line = error_of(capsys, "eval", protocol, *RANDOM, "--out", tmp_path / "e", *quick, override)
    assert f"option '{key}'" in line


def test_eval_image_size_other_than_a_fixed_backbone_is_refused(tmp_path, capsys):
    line = error_of(capsys, "eval", "knn", *RANDOM, "--out", tmp_path / "e", "image_size=64")
    assert "option 'image_size': this backbone is built for 16 px" in line


@pytest.mark.parametrize("override, needle", [
    ("crop_ratio=50", "option 'crop_ratio': must be in (0, 1]"),
    ("crop_ratio=.nan", "option 'crop_ratio': must be a finite number"),
    ("benchmarks=[]", "option 'benchmarks': must not be an empty list"),
])
def test_eval_robustness_options(tmp_path, capsys, override, needle):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "robustness.json").write_text("{}")
    line = error_of(capsys, "eval", "robustness", *RANDOM, "--linear-head", tmp_path / "nohead", "--out",
                    tmp_path / "e", "--max-images", "8",
                    *(["benchmarks=[clean]"] if not override.startswith("benchmarks=") else []), override)
    assert needle in line
    assert (tmp_path / "e" / "robustness.json").read_text() == "{}"  # an earlier result is kept


@pytest.mark.parametrize("args, key", [(["warmup_steps=-1"], "warmup_steps"), (["threads=-1"], "threads"),
                                       (["peak_size=-1"], "peak_size"), (["--steps", "0"], "steps")])
def test_eval_efficiency_options(tmp_path, capsys, args, key):
    line = error_of(capsys, "eval", "efficiency", "--out", tmp_path / "e", "--methods", "moby", "steps=1",
                    "device=cpu", "precision=fp32", *args)
    assert f"option '{key}'" in line


# ---------------------------------------------------------------------------------------------
# visualize, synth-data, report, sweep: options and output places


def test_visualize_max_images_0_is_refused(tmp_path, capsys):
    line = error_of(capsys, "visualize", "--checkpoint", "random", "backbone=cpu-demo", "device=cpu", "--out",
                    tmp_path / "v", "max_images=0")
    assert "option 'max_images': must be >= 1" in line


@pytest.mark.parametrize("action, override, needle", [
    ("train", "norm_num_groups=0", "synth-data train option 'norm_num_groups': must be >= 1"),
    ("train", "beta_schedule=nope", "synth-data train option 'beta_schedule': must be one of"),
    ("generate", "guidance=.nan", "synth-data generate option 'guidance': must be a finite number"),
])
def test_synth_data_options(tmp_path, capsys, action, override, needle):
    where = ["--data", "digits"] if action == "train" else ["--model", tmp_path / "m", "--per-class", "1"]
    line = error_of(capsys, "synth-data", action, *where, "--out", tmp_path / "o", "device=cpu", override)
    assert needle in line


@pytest.mark.parametrize("command", [
    lambda d, f: ["report", d, "--out", f],
    lambda d, f: ["report", "curves", d, "--out", f / "c.png"],
    lambda d, f: ["visualize", "--checkpoint", "random", "backbone=cpu-demo", "device=cpu", "--out", f],
    lambda d, f: ["eval", "efficiency", "--methods", "moby", "device=cpu", "--out", f],
    lambda d, f: ["sweep", d / "spec.yaml", "--out", f],
])
def test_output_places_are_checked_before_work(tmp_path, capsys, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"base": "cpu-demo", "seeds": 1, "overrides": CPU}))
    line = error_of(capsys, *command(tmp_path, a_file))
    assert "a_file" in line and ("existing file" in line or "is a file" in line)


def _spec(tmp_path, **extra) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": "cpu-demo", "seeds": 1, "overrides": CPU + ["epochs=2"],
                                    "axes": {"grid": {"method": ["moby"]}}, **extra}))
    return str(path)


@pytest.mark.parametrize("linear, needle", [({"foo": 1}, "unknown option 'foo'"),
                                            ({"lrs": [float("inf")]}, "option 'lrs': must be a finite number"),
                                            ({"epochs": 2, "warmup_epochs": 5}, "option 'warmup_epochs'")])
def test_sweep_dry_run_validates_the_linear_section(tmp_path, capsys, linear, needle):
    line = error_of(capsys, "sweep", _spec(tmp_path, linear=linear), "--out", tmp_path / "o", "--dry-run")
    assert "linear: section" in line and needle in line


def test_eval_linear_takes_scientific_notation_in_lists(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["eval", "linear", *RANDOM, "--out", str(out), "epochs=1", "warmup_epochs=0", "cache_features=true",
                 "lr_batch_ref=0", "lrs=[1e-1, 5e-1]"]) == 0, capsys.readouterr().err
    assert [r["lr"] for r in json.loads((out / "linear.json").read_text())["grid"]] == [0.1, 0.5]


def test_sweep_with_a_binary_saved_config_is_one_paragraph(tmp_path, capsys):
    run = tmp_path / "o" / "method-moby" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00\x81 binary")
    line = error_of(capsys, "sweep", _spec(tmp_path), "--out", tmp_path / "o", "--dry-run")
    assert "config.yaml cannot be read" in line


# ---------------------------------------------------------------------------------------------
# A key given twice: overrides and YAML files


def test_a_key_given_twice_with_other_values_is_refused_naming_it(tmp_path, capsys):
    """`k=[1,20] ... k=[5]` took the last value silently: half the command line was ignored."""
    with pytest.raises(SyncoError, match=r"option 'ks' is given twice with different values \('ks=\[1,20\]' and "
                                         r"'ks=\[5\]'\)"):
        apply_overrides(Opts(), ["ks=[1,20]", "size=8", "ks=[5]"])
    o = apply_overrides(Opts(), ["ks=[1, 20]", "ks=[1,20]", "size=8", "size=8.0"])  # the same value twice: fine
    assert o.ks == [1, 20] and o.size == 8
    with pytest.raises(SyncoError, match="'mode' is given twice"):
        apply_overrides(Opts(), ["mode=a", "mode=b"])
    # through the command line, before any work (the data root below does not exist: not reached)
    line = error_of(capsys, "pretrain", "--out", tmp_path / "r", *CPU, "epochs=2", "data.dataset=folder",
                    "data.root=/nonexistent/synco", "epochs=3")
    assert "config key 'epochs' is given twice" in line and not (tmp_path / "r" / "checkpoint.pt").exists()


def test_layered_overrides_replace_keys_only_between_layers():
    assert layer_overrides(["epochs=2", "seed=1"], ["epochs=1"], ["method=moby"]) == \
        ["seed=1", "epochs=1", "method=moby"]
    with pytest.raises(SyncoError, match="'epochs' is given twice"):
        layer_overrides(["epochs=2"], ["epochs=1", "epochs=3"])


def test_a_sweep_command_line_override_replaces_the_specs_value(tmp_path):
    """The spec's `epochs=2` and `synco sweep SPEC epochs=1`: each run gets epochs=1, once (synco pretrain refuses a
    key given twice with different values, so the runs' command lines must not carry both)."""
    from synco.sweep import runner
    from synco.sweep.spec import load_spec

    (run,) = runner.plan(load_spec(_spec(tmp_path)), tmp_path / "o", extra=["epochs=1"])
    assert run.cfg.epochs == 1 and [o for o in run.overrides if o.startswith("epochs=")] == ["epochs=1"]
    assert load_config("cpu-demo", run.overrides).epochs == 1


@pytest.mark.parametrize("where", ["spec", "preset"])
def test_yaml_with_a_key_given_twice_is_refused_naming_the_key_file_and_lines(tmp_path, capsys, where):
    """PyYAML keeps the last of two equal keys (`seeds: 1` then `seeds: 3` ran 3 seeds): every YAML synco reads
    goes through synco.options.load_yaml, which refuses it. Merge keys (`<<: *base`) may still be overridden."""
    if where == "spec":
        path = tmp_path / "dup.yaml"
        path.write_text("base: cpu-demo\nseeds: 1\nseeds: 3\naxes: {grid: {method: [moby]}}\n")
        line = error_of(capsys, "sweep", path, "--out", tmp_path / "o", "--dry-run")
        key, lines = "seeds", "line 2 and line 3"
    else:
        path = tmp_path / "cfg.yaml"
        path.write_text("base: cpu-demo\noptim:\n  accum_steps: 1\n  batch_size: 32\n  batch_size: 64\n")
        line = error_of(capsys, "pretrain", "--config", path, "--out", tmp_path / "r", *CPU)
        key, lines = "batch_size", "line 4 and line 5"
    assert f"'{key}' is given twice" in line and lines in line and str(path) in line
    from synco.options import load_yaml

    assert load_yaml("a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}\n")["b"] == {"x": 3, "y": 2}


def test_options_have_every_field_their_helpers_read():
    """The backends and the step measurement read a command's options through a Protocol (no import back into the
    command's module): the options must keep each field, with the same type."""
    import typing

    from synco.eval.efficiency import EfficiencyOptions
    from synco.eval.efficiency_measure import Measurement
    from synco.synth.backends import Sampling
    from synco.synth.generate import GenerateConfig

    for protocol, options in ((Sampling, GenerateConfig), (Measurement, EfficiencyOptions)):
        wanted, have = typing.get_type_hints(protocol), typing.get_type_hints(options)
        assert {k: have.get(k) for k in wanted} == wanted, protocol.__name__


def test_an_option_set_dotted_and_in_its_section_is_one_option(tmp_path):
    """``model.proj_dim=32`` and ``model={proj_dim: 16}`` set one option twice: refused with different values (it
    was whichever came last), accepted with the same, on the command line, in a config file and in a sweep."""
    with pytest.raises(SyncoError, match=r"'model\.proj_dim' is given twice with different values"):
        load_config("cpu-demo", ["model.proj_dim=32", "model={proj_dim: 16, proj_hidden: 64}"])
    assert load_config("cpu-demo", ["model.proj_dim=16", "model={proj_dim: 16}"]).model.proj_dim == 16
    assert load_config("cpu-demo", ["model={proj_dim: 16}", "model.proj_hidden=64"]).model.proj_hidden == 64
    path = tmp_path / "c.yaml"
    path.write_text("base: cpu-demo\nmodel.proj_dim: 32\nmodel:\n  proj_dim: 16\n")
    with pytest.raises(SyncoError, match=r"'model\.proj_dim' is given twice"):
        load_config(str(path))
    from synco.sweep import runner
    from synco.sweep.spec import parse_spec

    spec = parse_spec({"base": "cpu-demo", "seeds": 1, "axes": {"grid": {"model.proj_dim": [16, 32]}}}, "t", "t")
    with pytest.raises(SyncoError, match="model.proj_dim is swept by the spec's axes"):
        runner.plan(spec, tmp_path / "s", ["model={proj_dim: 8, proj_hidden: 128}"])


def test_one_number_written_two_ways_is_one_value(tmp_path):
    assert load_config("cpu-demo", ["optim.base_lr=0.1", "optim.base_lr=1e-1"]).optim.base_lr == 0.1
    with pytest.raises(SyncoError, match="given twice"):
        load_config("cpu-demo", ["optim.base_lr=0.1", "optim.base_lr=1e-2"])


def test_an_out_that_is_a_link_to_nowhere_says_so(tmp_path):
    from synco.io import check_output_dir

    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SyncoError, match="symbolic link to .*nowhere', which does not exist"):
        check_output_dir(tmp_path / "link")


def test_a_saved_run_config_with_a_key_twice_is_named(tmp_path):
    from synco.sweep import runner
    from synco.sweep.spec import parse_spec

    spec = parse_spec({"base": "cpu-demo", "seeds": 1}, "t", "t")
    (run,) = runner.plan(spec, tmp_path)
    run.dir.mkdir(parents=True)
    (run.dir / "config.yaml").write_text("epochs: 2\nepochs: 3\n")
    (run.dir / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(SyncoError, match="the key 'epochs' is given twice"):
        runner.plan(spec, tmp_path)
