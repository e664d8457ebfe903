"""`synco sweep`: aggregation maths on known numbers, spec parsing and validation, a real tiny local sweep
(2 points x 2 seeds, --jobs 2), resuming it through submitit's local executor, the linear probe step,
failure reporting, the output files, and `synco report curves`."""

import json
import math
import os
import signal
import sys

import pytest
import yaml

from synco.cli.main import main
from synco.config import load_config
from synco.errors import SyncoError
from synco.sweep import outputs, runner
from synco.sweep.launch import LOCKED, Task, run_local, run_task
from synco.sweep.spec import expand_points, load_spec, parse_seeds_arg, parse_spec, spec_names
from synco.sweep.stats import describe, fmt_stats, paired_difference

# ---------------------------------------------------------------------------------------------
# Statistics


def test_describe_known_numbers():
    s = describe([1, 2, 3, 4, 5])
    assert s.n == 5 and s.mean == 3.0
    assert s.std == pytest.approx(math.sqrt(2.5))  # 1.5811
    # t(0.975, 4) = 2.7764; half-width = 2.7764 * 1.5811 / sqrt(5) = 1.9632
    assert s.half_width == pytest.approx(2.776445 * 1.581139 / math.sqrt(5), abs=1e-5)
    assert (s.ci_low, s.ci_high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-5)
    assert fmt_stats(s) == "3.00 ± 1.58 [1.04, 4.96]"


def test_describe_one_value_and_none():
    one = describe([61.5, None, float("nan")])
    assert one.n == 1 and one.mean == 61.5 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert fmt_stats(one) == "61.50 ± n/a [n/a]"
    assert one.to_dict()["ci_low"] is None and one.to_dict()["std"] is None  # JSON null, not NaN
    assert fmt_stats(describe([])) == "n/a"


def test_paired_difference_by_hand():
    # Seeds 0..2 are common; seed 3 (only a) and 4 (only b) are ignored. Differences: 2, 1, 3.
    a = {0: 70.0, 1: 72.0, 2: 71.0, 3: 69.0}
    b = {0: 68.0, 1: 71.0, 2: 68.0, 4: 60.0}
    d = paired_difference(a, b)
    assert d.seeds == [0, 1, 2] and d.n == 3
    assert d.mean == pytest.approx(2.0) and d.std == pytest.approx(1.0)
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, 2) = 4.3027
    assert (d.ci_low, d.ci_high) == pytest.approx((2 - half, 2 + half), abs=1e-5)
    assert fmt_stats(d, signed=True) == "+2.00 ± 1.00 [-0.48, 4.48]"
    lone = paired_difference({0: 1.0}, {0: 0.5, 1: 2.0})
    assert lone.n == 1 and lone.mean == 0.5 and math.isnan(lone.ci_high)


# ---------------------------------------------------------------------------------------------
# Specs


def _spec(**kw):
    data = {"base": "cpu-demo", "seeds": 2, **kw}
    return parse_spec(data, "test spec", "t")


def test_grid_zip_labels_and_list_values():
    spec = _spec(axes={
        "grid": {"negatives.n_hard": [16, 32], "negatives.counts": [[4] * 6, [8] * 6]},
        "zip": {"negatives.warmup_epochs": [0, 1], "negatives.cooldown_epochs": [0, 2]},
        "labels": {"negatives.counts": ["24", "48"], "zip": ["off", "on"]},
        "names": {"zip": "window"}})
    points = expand_points(spec)
    assert [d.name for d in spec.dims] == ["n_hard", "counts", "window"]
    assert spec.dims[0].numeric and not spec.dims[1].numeric and not spec.dims[2].numeric
    assert len(points) == 8 and len({p.name for p in points}) == 8
    p = points[-1]
    assert p.name == "n_hard-32__counts-48__window-on"
    assert p.values == {"negatives.n_hard": 32, "negatives.counts": [8] * 6, "negatives.warmup_epochs": 1,
                        "negatives.cooldown_epochs": 2}
    assert p.levels == {"n_hard": "32", "counts": "48", "window": "on"}
    assert "negatives.counts=[8, 8, 8, 8, 8, 8]" in p.overrides
    unlabelled = expand_points(_spec(axes={"grid": {"negatives.counts": [[4, 0, 0, 0, 0, 0]]}}))
    assert unlabelled[0].name == "counts-4_0_0_0_0_0"


def test_seeds_and_compare_forms():
    assert _spec(seeds=3).seeds == [0, 1, 2]
    assert _spec(seeds=[4, 7]).seeds == [4, 7]
    assert parse_seeds_arg("3") == [0, 1, 2] and parse_seeds_arg("0,5") == [0, 5]
    spec = _spec(axes={"grid": {"method": ["synco", "moby", "byol"]}}, compare={"axis": "method", "baseline": "moby"})
    assert spec.compare.pairs == [(0, 1), (2, 1)]
    spec = _spec(axes={"grid": {"method": ["synco", "moby", "byol"]}},
                 compare={"axis": "method", "pairs": [["synco", "moby"], ["synco", "byol"]]})
    assert spec.compare.pairs == [(0, 1), (0, 2)]
    assert expand_points(_spec())[0].name == "base"  # no axes: seeds of the base config only


@pytest.mark.parametrize("data, needle", [
    ({"base": "cpu-demo"}, "'seeds' is missing"),
    ({"base": "cpu-demo", "seeds": 0}, "'seeds' must be"),
    ({"seeds": 2}, "'base' must name a preset"),
    ({"base": "cpu-demo", "seeds": 2, "axis": {}}, "unknown entry 'axis'"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"grid": {"epochs": []}}}, "non-empty list"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"grid": {"epochs": [1, 1]}}}, "twice"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"zip": {"epochs": [1, 2], "seed": [1, 2]}}}, "under 'seeds:'"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"zip": {"epochs": [1, 2], "log_every": [1]}}}, "equal lengths"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"grid": {"epochs": [1, 2]}, "labels": {"epochs": ["a"]}}},
     "list of 2 names"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"grid": {"epochs": [1, 2]}, "labels": {"epoch": ["a", "b"]}}},
     "not a grid key"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"grid": {"method": ["synco"]}},
      "compare": {"axis": "method", "baseline": "dino"}}, "'dino' is not a level"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"grid": {"method": ["synco"]}},
      "compare": {"axis": "epochs", "baseline": "x"}}, "not a dimension"),
    ({"base": "cpu-demo", "seeds": 2, "overrides": ["epochs=2"], "axes": {"grid": {"epochs": [1, 2]}}},
     "both an override and an axis"),
    ({"base": "cpu-demo", "seeds": 2, "overrides": "epochs=2"}, "list of key=value"),
    ({"base": "cpu-demo", "seeds": 2, "axes": {"grid": {"epochs": [1, 2]}, "labels": {"epochs": ["a b", "a_b"]}}},
     "same folder name"),
    ({"base": "cpu-demo", "seeds": 2, "slurm": {"gpu": 1}}, "slurm: unknown entry 'gpu'"),
    ({"base": "cpu-demo", "seeds": 2, "metrics": ["knn_top1", "nope_metric"]}, "'nope_metric' is not a number"),
])
def test_bad_specs_are_one_paragraph(data, needle):
    with pytest.raises(SyncoError, match=None) as e:
        expand_points(parse_spec(data, "test spec", "t"))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_shipped_spec_validates(tmp_path):
    names = spec_names()
    for kind in ("methods", "figure3", "per-type", "table2-mocov3", "table3-drop-path", "table4-queue",
                 "table5-temperature", "table6-momentum", "window", "syn2co-ratio"):
        assert f"{kind}-digits" in names and f"{kind}-imagenet100" in names, kind
    for name in names:
        spec = load_spec(name)
        extra = [f"data.root={tmp_path}"] if "imagenet100" in name else []
        extra += [f"data.synthetic_root={tmp_path}"] if "syn2co" in name else []
        runs = runner.plan(spec, tmp_path / name, extra, launcher="slurm" if "imagenet100" in name else "local")
        assert len(runs) == len(expand_points(spec)) * len(spec.seeds) >= 3
        if "imagenet100" in name:
            assert spec.base == "imagenet100-deit-s"
            with pytest.raises(SyncoError, match="data.root=/data/imagenet"):
                runner.plan(spec, tmp_path / name, [f"data.synthetic_root={tmp_path}"])
        else:
            assert spec.base == "cpu-demo"
    assert load_spec("methods-digits").seeds == [0, 1, 2, 3, 4]


def test_each_point_is_built_like_synco_pretrain_would(tmp_path, capsys):
    """A ViT without img_size follows data.image_size. With 112 px shared, a point at 224 gets the config
    `synco pretrain --config BASE data.image_size=224` gets (timm's 224 px ViT), not the backbone resolved for the
    shared 112 px and then a refusal."""
    base = tmp_path / "vit112.yaml"
    base.write_text(yaml.safe_dump({"base": "cpu-demo", "data": {"image_size": 112}, "model": {
        "backbone_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}}}))
    spec = tmp_path / "sizes.yaml"
    spec.write_text(yaml.safe_dump({"base": "vit112.yaml", "seeds": 1, "overrides": ["optim.batch_size=32"],
                                    "axes": {"grid": {"data.image_size": [112, 224]}}}))
    sp = load_spec(str(spec))
    runs = runner.plan(sp, tmp_path / "o")
    assert [r.cfg.data.image_size for r in runs] == [112, 224]
    assert runs[0].cfg.model.backbone_kwargs["img_size"] == 112 and "img_size" not in runs[1].cfg.model.backbone_kwargs
    assert all(r.cfg == load_config(sp.base, r.overrides) for r in runs)  # what `synco pretrain` will run
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "2 runs" in capsys.readouterr().out


def test_points_are_validated_before_anything_runs(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"base": "cpu-demo", "seeds": 1, "overrides": ["optim.batch_size=32"],
                                    "axes": {"grid": {"contrast.queue_size": [64, 100]}}}))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "point 'queue_size-100'" in err and "multiple of the global batch" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["sweep", str(spec), "contrast.queue_size=64"]) == 2
    assert "swept by the spec's axes" in capsys.readouterr().err
    assert main(["sweep", str(spec), "negatives.nhard=3"]) == 2
    assert "unknown config key 'negatives.nhard'" in capsys.readouterr().err
    assert main(["sweep", "no-such-spec"]) == 2
    assert "Shipped specs: " in capsys.readouterr().err


def test_cli_lists_shipped_specs_and_help(capsys):
    assert main(["sweep"]) == 0
    out = capsys.readouterr().out
    assert "methods-digits" in out and "figure3-imagenet100" in out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "sweep" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Outputs from fake runs (no training)


def _fake_run(run, knn, loss=None):
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "summary.json").write_text(json.dumps({"knn_top1": knn, "method": run.cfg.method}))
    if loss is not None:
        (run.dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 0, "loss": loss + 1, "pos_cos": 0.1})
                                               + "\n" + json.dumps({"step": 2, "epoch": 0, "loss": loss,
                                                                    "pos_cos": 0.2, "hardest_neg_cos": 0.3}) + "\n")


def test_outputs_of_a_2d_grid_and_a_numeric_axis(tmp_path):
    spec = _spec(axes={"grid": {"contrast.temperature": [0.1, 0.2], "method": ["synco", "moby"]}}, seeds=3,
                 compare={"axis": "method", "baseline": "moby"})
    runs = runner.plan(spec, tmp_path)
    knn = {("0.1", "synco"): [60, 62, 61], ("0.1", "moby"): [58, 61, 59], ("0.2", "synco"): [70, None, None],
           ("0.2", "moby"): [66, 64, 65]}
    for r in runs:
        v = knn[(r.point.levels["temperature"], r.point.levels["method"])][r.seed]
        if v is not None:
            _fake_run(r, v, loss=5.0 + r.seed)
    res = runner.write_outputs(spec, runs, tmp_path, [], "synco sweep t")
    names = {f.name for f in res.files}
    assert {"sweep.csv", "sweep.md", "sweep.json", "sweep_paired.csv", "sweep_knn_top1.png",
            "sweep_knn_top1_heatmap.png", "sweep_paired_knn_top1.png"} <= names
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
    rows = list(__import__("csv").DictReader((tmp_path / "sweep.csv").open()))
    knn_rows = {(r["temperature"], r["method"]): r for r in rows if r["metric"] == "knn_top1"}
    assert float(knn_rows[("0.1", "synco")]["mean"]) == pytest.approx(61.0)
    assert float(knn_rows[("0.1", "synco")]["std"]) == pytest.approx(1.0)
    assert knn_rows[("0.2", "synco")]["n"] == "1" and knn_rows[("0.2", "synco")]["ci_low"] == ""
    assert knn_rows[("0.1", "moby")]["seed1"] == "61.0"
    final_loss = {(r["temperature"], r["method"]): r for r in rows if r["metric"] == "final_loss"}
    assert float(final_loss[("0.1", "moby")]["mean"]) == pytest.approx(6.0)  # from metrics.jsonl's last record
    md = (tmp_path / "sweep.md").read_text()
    assert "| 0.2 | synco | 1/3 | 70.00 ± n/a [n/a]" in md and "synco − moby" in md
    data = json.loads((tmp_path / "sweep.json").read_text())
    paired = {(p["context"]["temperature"], p["metric"]): p for p in data["paired"]}
    # seeds 0,1,2 at tau=0.1: differences 2, 1, 2
    assert paired[("0.1", "knn_top1")]["mean"] == pytest.approx(5 / 3) and paired[("0.1", "knn_top1")]["n"] == 3
    assert paired[("0.2", "knn_top1")]["n"] == 1 and paired[("0.2", "knn_top1")]["ci_low"] is None
    line = _spec(axes={"grid": {"contrast.queue_size": [64, 128, 1024]}}, overrides=["optim.batch_size=32"])
    lruns = runner.plan(line, tmp_path / "line")
    for r in lruns:
        _fake_run(r, 50.0 + r.seed + r.point.index[0])
    files = runner.write_outputs(line, lruns, tmp_path / "line", [], "").files
    assert (tmp_path / "line" / "sweep_knn_top1.png") in files


def test_a_config_note_is_said_once_per_plan(tmp_path, caplog):
    spec = _spec(axes={"grid": {"contrast.temperature": [0.1, 0.2]}}, overrides=["method=mochi"], seeds=3)
    with caplog.at_level("WARNING", logger="synco.config"):
        runner.plan(spec, tmp_path)
    notes = [r for r in caplog.records if "method=mochi" in r.getMessage()]
    assert len(notes) == 1
    caplog.clear()
    load_config("cpu-demo", ["method=mochi"])  # outside a plan, every load says it
    assert any("method=mochi" in r.getMessage() for r in caplog.records)


def test_a_linear_section_naming_a_missing_root_fails_the_plan(tmp_path):
    spec = _spec(linear={"dataset": "folder", "root": str(tmp_path / "nowhere")})
    runs = runner.plan(spec, tmp_path / "out")
    runner.check_linear_options(spec, runs)  # without --linear the probes' data is not needed
    with pytest.raises(SyncoError, match="nowhere' does not exist"):
        runner.check_linear_options(spec, runs, probes=True)


@pytest.mark.parametrize("key, value", [("final_loss", float("nan")), ("final_loss", "9.9"), ("final_loss", True),
                                        ("knn_top1", 150.0), ("knn_top1_random_init", -1)])
def test_a_summary_with_a_damaged_number_is_resumed_not_counted(tmp_path, key, value):
    spec = _spec(seeds=1)
    (run,) = runner.plan(spec, tmp_path)
    _fake_run(run, 90.0)
    summary = {"knn_top1": 90.0, "final_loss": 4.2, "chance_loss": None}  # null: a method without negatives
    (run.dir / "summary.json").write_text(json.dumps(summary))
    assert runner.finished(run.dir)
    (run.dir / "summary.json").write_text(json.dumps({**summary, key: value}))
    assert not runner.finished(run.dir)  # so planned as a run to resume (synco pretrain rewrites the summary)


@pytest.mark.parametrize("value", [float("nan"), 150.0, -1, "88", "torn"])
def test_a_cached_linear_top1_that_is_no_percentage_is_probed_again_never_averaged(tmp_path, value):
    spec = _spec(seeds=1)
    (run,) = runner.plan(spec, tmp_path)
    _fake_run(run, 90.0)
    cache = run.dir / "sweep_eval.json"
    cache.write_text(json.dumps({"linear_top1": 88.5}))
    assert outputs.run_metrics(run.dir, ["linear_top1"]) == {"linear_top1": 88.5}
    cache.write_text(json.dumps({"linear_top1": value}) if value != "torn" else '{"linear_top1": 8')
    assert runner.cached_linear(run, spec) is None  # --linear runs the probe again
    with pytest.raises(SyncoError, match="sweep_eval.json' holds linear_top1"):
        outputs.run_metrics(run.dir, ["linear_top1"])


def test_a_finished_run_missing_a_number_its_point_has_is_said(tmp_path, capsys):
    spec = _spec(seeds=2)
    runs = runner.plan(spec, tmp_path)
    for r in runs:
        _fake_run(r, 90.0 + r.seed)
    (runs[1].dir / "summary.json").write_text(json.dumps({"method": "synco", "final_loss": 4.0}))  # no knn_top1
    runner.write_outputs(spec, runs, tmp_path, [], "")
    assert f"{runs[1].dir}: no knn_top1" in capsys.readouterr().err


def test_failed_run_is_reported_and_the_others_still_finish(tmp_path, monkeypatch, capsys):
    """The launcher keeps going after a failure; the sweep exits 2 naming the failed run and its log."""
    def fake_task(run, spec, launcher, threads):
        code = ("import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); "
                "d.mkdir(parents=True, exist_ok=True); "
                "sys.exit(3) if 'moby' in str(d) else (d / 'summary.json').write_text(json.dumps({'knn_top1': 50}))")
        return Task(run.name, [sys.executable, "-c", code, str(run.dir)], str(run.dir / "log.txt"))

    monkeypatch.setattr(runner, "pretrain_task", fake_task)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": "cpu-demo", "seeds": 2, "axes": {"grid": {"method": ["synco", "moby"]}}}))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--jobs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "method-moby/seed0 (exit 3)" in err and str(tmp_path / "o" / "method-moby" / "seed1" / "log.txt") in err
    md = (tmp_path / "o" / "sweep.md").read_text()
    assert "| synco | 2/2 | 50.00 ± 0.00" in md and "## Failed runs" in md


def test_a_second_sweep_on_the_same_out_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """One sweep per --out: a second one would launch the same runs again, find them locked, and list runs as
    failed that the first one finishes. It stops at once, naming the first's PID, and starts nothing."""
    import subprocess

    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from synco.io import DirLock; "
                               f"DirLock({str(out)!r}, 'sweep').acquire(); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # a handshake, not a sleep
        started = []
        monkeypatch.setattr(runner, "run_tasks", lambda *a, **k: started.append(a) or {})
        spec = tmp_path / "s.yaml"
        spec.write_text(yaml.safe_dump({"base": "cpu-demo", "seeds": 1, "axes": {"grid": {"method": ["moby"]}}}))
        assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(holder.pid) in err and not started and "Traceback" not in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


# A task that says it started, then waits until N tasks have (a handshake, no clock; it gives up with exit 99 after
# 120 s, which only turns a hang into a failure): run one at a time, the first one would never see the others.
WAIT_FOR_ALL = """
import os, sys, time
from pathlib import Path

folder, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(folder / f"started-{me}").touch()
give_up = time.monotonic() + 120
while len(list(folder.glob("started-*"))) < n:
    if time.monotonic() > give_up:
        sys.exit(99)
    time.sleep(0.01)
print("hi", me, os.environ["MARK"])
sys.exit(int(me[1:]))
"""


def test_run_local_runs_jobs_concurrently_and_logs(tmp_path):
    tasks = [Task(f"t{i}", [sys.executable, "-c", WAIT_FOR_ALL, str(tmp_path), f"t{i}", "3"],
                  str(tmp_path / f"t{i}" / "log.txt"), {"MARK": "m"}) for i in range(3)]
    rcs = run_local(tasks, jobs=3, progress=False)
    assert rcs == {"t0": 0, "t1": 1, "t2": 2}
    assert "hi t2 m" in (tmp_path / "t2" / "log.txt").read_text()
    # A run folder locked by a live process (e.g. a run left going by a killed sweep) is not started twice.
    import fcntl

    lock = tmp_path / ".sweep.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        task = Task("busy", [sys.executable, "-c", "print('ran')"], str(tmp_path / "busy.txt"), lock=str(lock))
        assert run_task(task) == LOCKED and "another process" in (tmp_path / "busy.txt").read_text()
    assert run_task(task) == 0 and "ran" in (tmp_path / "busy.txt").read_text()


# A task that says it started (and its PID), writes "stopped" when it receives SIGTERM, and otherwise waits to be
# stopped (up to 600 s, so that a launcher that never stops it fails instead of hanging).
RUN_UNTIL_STOPPED = """
import os, signal, sys, time
from pathlib import Path

folder, me = Path(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: ((folder / f"stopped-{me}").touch(), sys.exit(0)))
(folder / f"started-{me}").write_text(str(os.getpid()))
time.sleep(600)
"""


def test_interrupting_the_local_launcher_stops_its_runs(tmp_path):
    import _thread
    import threading

    from conftest import wait_for

    tasks = [Task(f"t{i}", [sys.executable, "-c", RUN_UNTIL_STOPPED, str(tmp_path), f"t{i}"],
                  str(tmp_path / f"t{i}.txt")) for i in range(3)]

    def interrupt_once_two_run():  # Ctrl-C once both tasks the 2 jobs allow are running: a handshake, no clock
        try:
            wait_for(lambda: len(list(tmp_path.glob("started-*"))) >= 2, "two started tasks")
        finally:
            _thread.interrupt_main()

    # A shell starts background jobs (`make test &`) with SIGINT ignored, and then interrupt_main does nothing.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_once_two_run, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_local(tasks, jobs=2, progress=False)  # the third task never starts
    finally:
        signal.signal(signal.SIGINT, old)
    from synco.sweep import launch

    assert not any(p.poll() is None for p in launch._running)
    # the two running tasks were stopped by the launcher's SIGTERM (not left to finish), the third never started
    assert sorted(p.name for p in tmp_path.glob("stopped-*")) == ["stopped-t0", "stopped-t1"]
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-t0", "started-t1"]
    assert not (tmp_path / "t2.txt").exists()


# ---------------------------------------------------------------------------------------------
# A real tiny sweep: 2 points x 2 seeds, --jobs 2; then resumed through submitit's local executor

# device=cpu, precision=fp32: the CPU path, GPU or not (auto would train on a visible GPU, in bf16).
TINY = ["device=cpu", "precision=fp32",
        "epochs=1", "data.max_images=64", "optim.batch_size=32", "contrast.queue_size=64", "negatives.n_hard=16",
        "negatives.counts=[4,4,4,4,4,4]", "negatives.warmup_epochs=0", "negatives.cooldown_epochs=0",
        "optim.warmup_epochs=0", "knn.k=[5]", "knn.max_train=64", "knn.max_test=64", "data.num_workers=0",
        "model.proj_hidden=64", "model.pred_hidden=64", "model.proj_dim=32", "log_every=1",
        "model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    spec = root / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "base": "cpu-demo", "overrides": TINY, "seeds": 2,
        "axes": {"grid": {"method": ["synco", "moby"]}},
        "compare": {"axis": "method", "baseline": "moby"},
        "slurm": {"cluster": "local", "time": 10},
        "linear": {"epochs": 1, "warmup_epochs": 0, "cache_features": True, "lrs": [0.1], "batch_size": 64,
                   "num_workers": 0, "val_fraction": 0.0, "device": "cpu"}}))
    out = root / "out"
    rc = main(["sweep", str(spec), "--out", str(out), "--jobs", "2", "--no-progress"])
    return spec, out, rc


@pytest.mark.slow
def test_local_sweep_writes_runs_table_and_plots(tiny_sweep):
    spec, out, rc = tiny_sweep
    assert rc == 0
    for point in ("method-synco", "method-moby"):
        for seed in (0, 1):
            run = out / point / f"seed{seed}"
            assert (run / "summary.json").is_file() and (run / "checkpoint.pt").is_file()
            log = (run / "log.txt").read_text()
            assert "threads=1" in log and f"seed={seed}" in log  # CPU threads split between the 2 jobs
            saved = yaml.safe_load((run / "config.yaml").read_text())
            assert saved["method"] == point.split("-")[1] and saved["seed"] == seed and saved["epochs"] == 1
    for name in ("sweep.csv", "sweep.md", "sweep.json", "sweep_knn_top1.png", "sweep_paired_knn_top1.png",
                 "sweep_paired.csv", "sweep_spec.yaml"):
        assert (out / name).stat().st_size > 0, name
    rows = [r for r in __import__("csv").DictReader((out / "sweep.csv").open()) if r["metric"] == "knn_top1"]
    assert [(r["method"], r["n"]) for r in rows] == [("synco", "2"), ("moby", "2")]
    for r in rows:
        seeds = [float(r["seed0"]), float(r["seed1"])]
        assert float(r["mean"]) == pytest.approx(sum(seeds) / 2)
    assert "synco − moby" in (out / "sweep.md").read_text()


@pytest.mark.slow
def test_resume_reruns_only_missing_runs_with_submitit_local(tiny_sweep):
    spec, out, rc = tiny_sweep
    assert rc == 0
    runs = {f"{p}/seed{s}": out / p / f"seed{s}" for p in ("method-synco", "method-moby") for s in (0, 1)}
    # Stamp every summary with a time long past, explicitly: a rewritten one then differs whatever the clock and the
    # filesystem's timestamp resolution (two writes within one tick would compare equal).
    past = 1_000_000_000 * 10**9  # 2001-09-09, in ns
    for d in runs.values():
        os.utime(d / "summary.json", ns=(past, past))
    for k in ("method-synco/seed1", "method-moby/seed0"):  # as if killed before finishing
        (runs[k] / "summary.json").unlink()
    assert main(["sweep", str(spec), "--out", str(out), "--launcher", "slurm", "--no-progress"]) == 0
    after = {k: (d / "summary.json").stat().st_mtime_ns for k, d in runs.items()}
    assert after["method-synco/seed0"] == after["method-moby/seed1"] == past  # kept, not rewritten
    assert after["method-synco/seed1"] != past and after["method-moby/seed0"] != past  # run again
    assert (runs["method-moby/seed0"] / "log.txt").read_text().count("=== ") == 2
    assert (runs["method-synco/seed0"] / "log.txt").read_text().count("=== ") == 1
    assert list((out / ".submitit").glob("*_submitted.pkl"))  # the jobs went through submitit
    # Another config for the same folders is refused up front, never overwritten.
    with pytest.raises(SyncoError, match="another config"):
        runner.run_sweep(load_spec(str(spec)), out=out, extra=["optim.base_lr=0.5"], progress=False)


@pytest.mark.slow
def test_linear_probe_step_is_cached(tiny_sweep):
    spec, out, _ = tiny_sweep
    sp = load_spec(str(spec))
    run = next(r for r in runner.plan(sp, out) if r.name == "method-synco/seed0")
    assert runner.cached_linear(run, sp) is None
    task = runner.linear_task(run, sp, "local", 1)
    assert task.cmd[1:5] == ["-m", "synco", "eval", "linear"]
    assert main(task.cmd[3:]) == 0  # the task's own command line, in this process (saves a Python start)
    top1 = runner.record_linear(run, sp)
    assert 0 <= top1 <= 100 and runner.cached_linear(run, sp) == top1
    assert outputs.run_metrics(run.dir, ["knn_top1", "linear_top1"])["linear_top1"] == top1
    (run.dir / "summary.json").write_text((run.dir / "summary.json").read_text() + " ")  # the run changed
    assert runner.cached_linear(run, sp) is None


# ---------------------------------------------------------------------------------------------
# Training curves


def _metrics_log(path, losses, knn_every=1):
    lines, step = [], 0
    for epoch, epoch_losses in enumerate(losses):
        for loss in epoch_losses:
            step += 1
            lines.append({"step": step, "epoch": epoch, "loss": loss, "pos_cos": 0.1 * epoch,
                          "hardest_neg_cos": 0.5})
        lines.append({"step": step, "epoch": epoch, "epoch_end": True, "real_images": 8})
        if (epoch + 1) % knn_every == 0:
            lines.append({"step": step, "epoch": epoch, "knn_top1": 40.0 + 10 * epoch})
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9, "lo')


def test_report_curves_from_metrics_logs(tmp_path, capsys):
    from synco.viz.curves import run_curves

    a, b = tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"
    _metrics_log(a, [[10.0, 9.0], [8.0, 7.0], [6.0, 5.0]])
    _metrics_log(b, [[10.0, 9.5, 9.0, 8.5]], knn_every=1)
    c = run_curves(a)
    x, y = c.series["loss"]
    assert list(x) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0]) and list(y) == [10, 9, 8, 7, 6, 5]
    kx, ky = c.series["knn_top1"]
    assert list(kx) == pytest.approx([1.0, 2.0, 3.0]) and list(ky) == [40, 50, 60]
    png = tmp_path / "curves.png"
    assert main(["report", "curves", str(a), str(b), "--out", str(png), "--title", "t"]) == 0
    assert png.stat().st_size > 0 and str(png) in capsys.readouterr().err
    assert main(["report", "curves", str(tmp_path / "nope"), "--out", str(png)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["report", "curves", str(a), "--panels", "loss,speed"]) == 2
    assert "unknown curve panel 'speed'" in capsys.readouterr().err
