import pytest

from synco.config import load_config, preset_names
from synco.errors import SyncoError


def test_every_preset_resolves():
    names = preset_names()
    for required in ("cpu-demo", "synco-imagenet-deit-s", "synco-imagenet-swin-t", "moby-imagenet-deit-s",
                     "byol-imagenet-deit-s", "synby-imagenet-deit-s", "imagenet100-deit-s"):
        assert required in names
    for name in names:
        cfg = load_config(name, ["data.root=/data"] if name != "cpu-demo" else [])
        assert cfg.method in ("synco", "moby", "byol")


def test_presets_follow_the_papers():
    c = load_config("synco-imagenet-deit-s", ["data.root=/x"])
    assert (c.optim.base_lr, c.optim.weight_decay, c.optim.warmup_epochs, c.epochs) == (1.5e-4, 0.1, 40, 300)
    assert (c.model.drop_path_online, c.model.drop_path_target) == (0.2, 0.0)
    assert (c.contrast.temperature, c.contrast.queue_size, c.contrast.momentum_start) == (0.2, 4096, 0.99)
    assert (c.negatives.n_hard, c.negatives.counts) == (256, [128] * 6)
    assert (c.negatives.warmup_epochs, c.negatives.cooldown_epochs) == (30, 100)
    assert c.model.backbone == "deit_small_patch16_224"
    s = load_config("synco-imagenet-swin-t", ["data.root=/x"])
    assert s.model.backbone == "swin_tiny_patch4_window7_224" and s.optim.base_lr == 1.5e-4
    m = load_config("moby-imagenet-deit-s", ["data.root=/x"])
    assert m.method == "moby" and m.optim == c.optim
    b = load_config("byol-imagenet-deit-s", ["data.root=/x"])
    assert b.method == "byol" and b.optim.accum_steps == 8 and b.model.drop_path_online == 0.0
    y = load_config("synby-imagenet-deit-s", ["data.root=/x"])
    assert (y.optim.base_lr, y.optim.weight_decay, y.optim.warmup_epochs, y.model.drop_path_online) == (0.03, 1e-4, 30, 0.05)
    i = load_config("imagenet100-deit-s", ["data.root=/x"])
    assert i.data.dataset == "imagenet100" and i.epochs == 100


def test_overrides_are_typed():
    cfg = load_config("cpu-demo", ["epochs=7", "optim.base_lr=1e-3", "negatives.counts=[1,2,3,4,5,6]",
                                   "model.backbone_kwargs={img_size: 16}", "data.root=null", "method=moby"])
    assert cfg.epochs == 7 and cfg.optim.base_lr == 1e-3 and cfg.negatives.counts == [1, 2, 3, 4, 5, 6]
    assert cfg.model.backbone_kwargs == {"img_size": 16} and cfg.method == "moby"
    assert isinstance(load_config("cpu-demo", ["optim.base_lr=1"]).optim.base_lr, float)


@pytest.mark.parametrize("override, needle", [
    ("optim.nope=1", "optim.nope"),
    ("nope=1", "nope"),
    ("epochs=ten", "epochs"),
    ("epochs=1.5", "epochs"),
    ("deterministic=3", "deterministic"),
    ("negatives.counts=5", "negatives.counts"),
    ("method=simclr", "method"),
    ("negatives.n_hard=5000", "negatives.n_hard"),
    ("negatives.alpha_max=2", "alpha_max"),
    ("negatives.beta_max=0.5", "beta_max"),
    ("negatives.sigma=-1", "sigma"),
    ("negatives.counts=[1,2,3]", "counts"),
    ("data.dataset=folder", "data.root"),
    ("data.synthetic_ratio=0.5", "data.synthetic_root"),
    ("noequals", "key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(SyncoError, match=needle):
        load_config("cpu-demo", [override])


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(SyncoError, match="unknown preset"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {base_lr: [1,\n")
    with pytest.raises(SyncoError, match="not valid YAML"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: cpu-demo\noptim:\n  base_rl: 0.1\n")
    with pytest.raises(SyncoError, match="optim.base_rl"):
        load_config(str(typo))
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: cpu-demo\nepochs: 3\noptim:\n  warmup_epochs: 1\n")
    assert load_config(str(ok)).epochs == 3


def test_augment_section_reads_a_bare_yaml_on_key(tmp_path):
    # YAML 1.1 reads `on:` as the boolean True; the config maps it back to data.augment.on
    path = tmp_path / "p.yaml"
    path.write_text("base: cpu-demo\ndata:\n  augment:\n    on: workers\n    flip_p: 0.25\n")
    cfg = load_config(str(path))
    assert (cfg.data.augment.on, cfg.data.augment.flip_p) == ("workers", 0.25)
    assert load_config("cpu-demo").data.augment.on == "device"
    with pytest.raises(SyncoError, match="data.augment.on"):
        load_config("cpu-demo", ["data.augment.on=gpu"])


@pytest.mark.parametrize("override", ["data.augment.jitter=[nan,0,0,0]", "data.augment.crop_scale=[a,1]",
                                      "data.augment.blur_p=[true,0.1]"])
def test_augment_lists_must_hold_numbers(override):
    with pytest.raises(SyncoError, match="data.augment.* must be a list of numbers"):
        load_config("cpu-demo", [override])


def test_validate_only_checks_and_resolve_fills_in(tmp_path):
    """``validate`` never changes a config; ``resolve`` fills in what it implies (a folder dataset for a root, a
    warm-up clamped to the run, the backbone built for data.image_size), once, after every override."""
    import copy

    from synco.config import Config, apply_overrides, resolve, validate
    from synco.errors import SyncoError

    cfg = load_config("cpu-demo", ["device=cpu", "epochs=2", "data.image_size=32",
                                   "model.backbone_kwargs={patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}"])
    assert cfg.optim.warmup_epochs == 2.0 and cfg.model.backbone_kwargs["img_size"] == 32
    before = copy.deepcopy(cfg)
    validate(cfg)
    assert cfg == before
    raw = apply_overrides(Config(), ["epochs=2", "optim.warmup_epochs=5", f"data.root={tmp_path}", "device=cpu",
                                     "data.image_size=32", "model.backbone=vit_tiny_patch16_224"])
    with pytest.raises(SyncoError, match="optim.warmup_epochs"):
        validate(copy.deepcopy(raw))  # not resolved: the check does not repair
    resolved = resolve(raw)
    assert resolved.optim.warmup_epochs == 2.0 and resolved.data.dataset == "folder"
    assert resolved.model.backbone_kwargs == {"img_size": 32}


def test_a_config_for_its_model_needs_no_data():
    from synco.errors import SyncoError

    with pytest.raises(SyncoError, match="data.root"):
        load_config("synco-imagenet-deit-s", ["device=cpu"])
    cfg = load_config("synco-imagenet-deit-s", ["device=cpu"], needs_data=False)
    assert cfg.data.root is None and cfg.model.backbone == "deit_small_patch16_224"
