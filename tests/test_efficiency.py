"""Efficiency benchmark (Table 15): equal parameter counts across methods, sane time and memory numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from synco.errors import SyncoError
from synco.eval.efficiency import EfficiencyOptions, efficiency_table, run_efficiency
from synco.eval.efficiency_measure import count_parameters
from synco.eval.meters import PARTS, count_flops, matmul_peak, rss_mb

# The cpu-demo model made smaller still: a 1-block ViT and narrow heads keep three methods to a few seconds.
SMALL = ["model.backbone_kwargs={img_size: 16, patch_size: 4, embed_dim: 48, depth: 1, num_heads: 2}",
         "model.proj_hidden=64", "model.pred_hidden=64", "model.proj_dim=32", "contrast.queue_size=256",
         "negatives.n_hard=16", "negatives.counts=[8, 8, 8, 8, 8, 8]"]


def test_count_parameters():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    m[1].requires_grad_(False)
    c = count_parameters(m)
    assert c["total_params"] == 15 + 8 and c["trainable_params"] == 15
    assert c["trainable_pct"] == pytest.approx(100 * 15 / 23)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("eff")
    opts = EfficiencyOptions(methods=["synco", "moby", "byol"], batch_size=16, steps=2, warmup_steps=0,
                             device="cpu", precision="fp32", epoch_images=1600, isolate=False)
    return run_efficiency(out, opts, SMALL, log=lambda s: None), out


def test_equal_parameter_counts_for_the_three_methods(result):
    res, _ = result
    rows = res["methods"]
    assert list(rows) == ["synco", "moby", "byol"]
    assert rows["synco"]["total_params"] == rows["moby"]["total_params"] == rows["byol"]["total_params"]
    assert rows["synco"]["trainable_params"] == rows["moby"]["trainable_params"] == rows["byol"]["trainable_params"]
    r = rows["synco"]
    # Trainable = online encoder (backbone + projector + predictor); total adds the target (backbone + projector).
    assert 0 < r["trainable_params"] < r["total_params"] < 2 * r["trainable_params"]
    assert 50 < r["trainable_pct"] < 100
    # The queues are buffers, not parameters: contrastive methods carry them, BYOL does not.
    assert rows["synco"]["buffer_mb"] == rows["moby"]["buffer_mb"] > rows["byol"]["buffer_mb"]
    assert rows["synco"]["synthetic"] and not rows["moby"]["synthetic"]


def test_time_and_memory_numbers_are_sane(result):
    res, out = result
    assert res["epoch_images"] == 1600 and res["memory"]
    for r in res["methods"].values():
        assert r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(16 / (r["step_ms"] / 1000))
        assert r["steps_per_epoch"] == 100
        assert r["epoch_min"] == pytest.approx(100 * r["step_ms"] / 1000 / 60)
        assert r["hours_300"] == pytest.approx(3 * r["hours_100"]) and r["hours_100"] == pytest.approx(
            100 * r["epoch_min"] / 60)
        assert 10 < r["avg_mem_mb"] <= r["peak_mem_mb"] < 64 * 1024
        assert r["peak_over_before_mb"] == pytest.approx(r["peak_mem_mb"] - r["before_model_mb"])
    assert res["process_baseline_mb"] > 0 and rss_mb() > 0
    saved = json.loads((out / "efficiency.json").read_text())
    assert saved["methods"]["moby"]["total_params"] == res["methods"]["moby"]["total_params"]
    table = efficiency_table(res)
    assert "| synco |" in table and "Trainable Params" in table and "300 Ep. (h)" in table


def test_bad_options_are_reported():
    with pytest.raises(SyncoError, match="methods"):
        run_efficiency(None, EfficiencyOptions(methods=["simclr"]), log=lambda s: None)
    with pytest.raises(SyncoError, match="multiple of the global batch"):  # checked before anything is measured
        run_efficiency(None, EfficiencyOptions(methods=["byol", "moby"], batch_size=48, steps=1, device="cpu",
                                               precision="fp32"), SMALL, log=lambda s: None)


def test_isolated_measurement_in_a_fresh_process(result):
    # On CPU the default: each method measured in a spawned process (same start for every method).
    opts = EfficiencyOptions(methods=["byol"], batch_size=16, steps=1, warmup_steps=0, device="cpu", precision="fp32",
                             threads=1)
    res = run_efficiency(None, opts, SMALL, log=lambda s: None)
    assert res["isolated"] and res["methods"]["byol"]["total_params"] == result[0]["methods"]["byol"]["total_params"]
    assert res["methods"]["byol"]["peak_mem_mb"] > 0 and res["methods"]["byol"]["step_ms"] > 0


def test_cli_efficiency(tmp_path, capsys):
    from synco.cli.main import main

    rc = main(["eval", "efficiency", "--methods", "moby,synco", "--steps", "1", "--batch-size", "16",
               "--out", str(tmp_path), "warmup_steps=0", "device=cpu", "precision=fp32", "isolate=false", *SMALL])
    assert rc == 0
    res = json.loads((tmp_path / "efficiency.json").read_text())
    assert list(res["methods"]) == ["moby", "synco"] and res["overrides"] == SMALL
    assert res["methods"]["moby"]["batch_size"] == 16 and res["backbone_kwargs"]["embed_dim"] == 48
    assert "| moby |" in capsys.readouterr().out


# --- FLOPs, MFU and the breakdown of a step ----------------------------------------------------------------


def test_flops_of_a_matmul_only_module_match_the_formula():
    b, i, h, o = 8, 16, 32, 4
    model = nn.Sequential(nn.Linear(i, h, bias=False), nn.Linear(h, o, bias=False))
    x = torch.randn(b, i)  # no gradient for the input: the first layer's backward computes its weight grad only
    total, per_module = count_flops(lambda: model(x).sum().backward())
    # forward 2bih + 2bho; backward: dW1 = 2bih, dW2 = 2bho and dX2 = 2bho
    assert total == 4 * b * i * h + 6 * b * h * o
    assert per_module["Global"] == total
    assert count_flops(lambda: model(x))[0] == 2 * b * (i * h + h * o)


def test_flops_of_attention_on_cpu_are_counted():
    """torch counts only the CUDA attention kernels; the CPU one is counted with the same formula."""
    bs, heads, seq, d = 2, 3, 5, 8
    q, k, v = (torch.randn(bs, heads, seq, d, requires_grad=True) for _ in range(3))
    forward, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert forward == 2 * (2 * bs * heads * seq * seq * d)  # q k^T and (softmax) v
    both, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert both == 3 * forward + 2 * bs * heads * seq * seq * d  # backward: 5 products of the same size


def test_matmul_peak_is_measured_here(one_thread):
    peak = matmul_peak(torch.device("cpu"), torch.float32, size=256, repeats=2)
    assert math.isfinite(peak["matmul_flops_per_s"]) and peak["matmul_flops_per_s"] > 0
    assert peak["matmul_shape"] == "256^3 float32" and peak["matmul_threads"] == 1


def test_flop_and_mfu_report(result):
    res, _ = result
    rows = res["methods"]
    for method, r in rows.items():
        for key in ("flops_per_step", "flops_per_image", "achieved_flops_per_s", "matmul_flops_per_s",
                    "matmul_utilization", "matmul_utilization_model"):
            assert math.isfinite(r[key]) and r[key] > 0, (method, key)
        assert r["flops_per_image"] == pytest.approx(r["flops_per_step"] / 16)
        assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / (r["step_ms"] / 1000))
        # MFU is against a datasheet peak: a CPU has none, so it is not stated rather than made up
        assert r["compute_dtype"] == "fp32" and r["datasheet"] is None and r["mfu"] is None and r["mfu_model"] is None
        assert r["matmul_utilization"] == pytest.approx(r["achieved_flops_per_s"] / r["matmul_flops_per_s"])
        assert r["matmul_utilization"] <= r["matmul_utilization_model"]  # the model's time is the step less data
        parts = r["flops_by_part"]
        assert sum(parts.values()) == r["flops_per_step"]
        assert parts["online"] > 2 * parts["target"] > 0  # forward + backward against a forward
        assert set(r["breakdown_ms"]) == set(PARTS) and all(v >= 0 for v in r["breakdown_ms"].values())
        # A step's time is the sum of its parts by definition (one clock, read at the part boundaries), so this
        # is an identity up to float rounding, not two clocks that happen to agree.
        assert sum(r["breakdown_ms"].values()) == pytest.approx(r["step_ms"], rel=1e-9)
        assert sum(r["breakdown_share"].values()) == pytest.approx(1, rel=1e-9)
        assert r["breakdown_ms"]["online forward"] > 0 and r["breakdown_ms"]["backward"] > 0
        assert r["steps"] == 2 and r["warmup_steps"] == 0 and not r["compile"] and r["precision"] == "fp32"
    # synthetic negatives: a part of synco's step only, with FLOPs of their own (the similarity to the queue and
    # the logits against them); BYOL has no queue at all
    assert rows["synco"]["breakdown_ms"]["synthetic negatives"] > 0
    assert rows["moby"]["breakdown_ms"]["synthetic negatives"] == 0
    assert rows["byol"]["breakdown_ms"]["synthetic negatives"] == 0
    assert rows["synco"]["flops_per_step"] > rows["moby"]["flops_per_step"] > rows["byol"]["flops_per_step"]
    table = efficiency_table(res)
    assert "MFU" in table and "GFLOP/step" in table and "synthetic negatives (%)" in table
    assert "1024^3 float32" in table and "timed on the spot" in table and "MFU n/a: no datasheet peak" in table


def test_breakdown_with_the_training_data_pipeline(result):
    """inputs=loader: batches come from the preset's pipeline, so the step waits for data; FLOPs stay the model's."""
    opts = EfficiencyOptions(methods=["moby"], batch_size=16, steps=2, warmup_steps=0, device="cpu", precision="fp32",
                             isolate=False, inputs="loader", epoch_images=1600)
    res = run_efficiency(None, opts, SMALL + ["data.num_workers=0"], log=lambda s: None)
    r = res["methods"]["moby"]
    assert r["inputs"] == "loader" and r["breakdown_ms"]["data wait"] > 0
    assert r["flops_per_step"] == result[0]["methods"]["moby"]["flops_per_step"]  # no augmentation FLOPs counted
    assert r["matmul_utilization"] < r["matmul_utilization_model"]  # the data part is left out of the model's time
    with pytest.raises(SyncoError, match="inputs"):
        run_efficiency(None, EfficiencyOptions(methods=["moby"], inputs="disk"), SMALL, log=lambda s: None)


def test_isolated_measurement_may_start_dataloader_workers():
    """Each method runs in a spawned child; with inputs=loader and worker processes the child starts its own
    children, which a daemonic process may not (it crashed with a traceback)."""
    opts = EfficiencyOptions(methods=["byol"], batch_size=16, steps=1, warmup_steps=0, device="cpu", precision="fp32",
                             isolate=True, inputs="loader", epoch_images=1600, flops=False)
    res = run_efficiency(None, opts, SMALL + ["data.num_workers=1", "data.augment.on=workers"], log=lambda s: None)
    assert res["isolated"] and res["methods"]["byol"]["breakdown_ms"]["data wait"] > 0


# --- what the window waits for, compile, DDP ---------------------------------------------------------------


class _CountingTimeline:
    """Stands in for StepTimeline in timed_window: one part per step, of known length (no clock involved)."""

    def __init__(self):
        self.steps = []

    def clear(self):
        self.steps = []

    def start(self):
        self.steps.append(len(self.steps) + 1.0)

    def parts_ms(self):
        return [{"backward": ms} for ms in self.steps]


def test_timed_window_waits_for_the_device_once_before_and_once_after(monkeypatch):
    """The measured steps run back to back: on CUDA the host waits for the device around the window only, not
    after every step (a sync per step drains the queue and times the host's launch latency too)."""
    from synco.eval import meters

    syncs = []
    monkeypatch.setattr(meters.torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    probe = meters.MemoryProbe(torch.device("cpu"))
    timeline = _CountingTimeline()
    timeline.start()  # a warm-up step's marks: cleared, not counted
    window = meters.timed_window(timeline.start, 5, torch.device("cuda"), timeline, probe)
    assert len(syncs) == 2
    assert window["step_ms"] == [1.0, 2.0, 3.0, 4.0, 5.0]  # each step's time is the sum of its parts
    assert len(window["mem_mb"]) == 5 and window["window_s"] >= 0


def test_compile_in_the_preset_compiles_the_online_encoder(monkeypatch):
    """compile=true: the steps go through torch.compile(model.online), as in the trainer (which may compile more
    of the model too). torch.compile is replaced by a recorder here (compiling on 2 shared cores takes minutes);
    the step runs eagerly through it."""
    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    opts = EfficiencyOptions(methods=["moby"], batch_size=16, steps=1, warmup_steps=0, device="cpu",
                             precision="fp32", isolate=False, flops=False)
    res = run_efficiency(None, opts, SMALL + ["compile=true"], log=lambda s: None)
    r = res["methods"]["moby"]
    assert type(compiled[0]).__name__ == "Encoder"  # the online encoder, first
    assert r["compile"] and r["warmup_steps"] == 2  # the first calls of a compiled module compile: not timed
    # no timer hooks on compiled encoders (they would break the graphs): their forwards are in the loss part
    assert r["breakdown_ms"]["online forward"] == r["breakdown_ms"]["target forward"] == 0
    assert "forwards are counted in 'loss (rest of forward)'" in r["breakdown_note"]


def test_efficiency_refuses_to_time_ddp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    opts = EfficiencyOptions(methods=["moby"], batch_size=16, steps=1, device="cpu", precision="fp32")
    with pytest.raises(SyncoError, match="does not time DDP"):
        run_efficiency(None, opts, SMALL, log=lambda s: None)


def test_cost_table_states_mfu_against_the_datasheet():
    """On a known GPU MFU is against its datasheet peak; the on-the-spot matmul stays as a labelled second."""
    from synco.eval.efficiency_tables import cost_yardsticks
    from synco.eval.meters import datasheet_peak

    row = {"flops_per_step": 1, "datasheet": datasheet_peak("NVIDIA H100 80GB HBM3", "bf16"), "compute_dtype": "bf16",
           "matmul_flops_per_s": 7.0e14, "matmul_shape": "8192^3 bfloat16", "matmul_threads": None}
    text = cost_yardsticks(row)
    assert "H100 SXM datasheet's dense bf16 peak, 989.4 TFLOPS" in text
    assert "8192^3 bfloat16 matmul timed on the spot, 700000.0 GFLOP/s" in text
    # an efficiency.json from before: its "mfu" was of the matmul timed on the spot, and is shown as that
    old = {"flops_per_step": 1, "mfu": 0.5, "peak_flops_per_s": 9.5e10, "peak_matmul": "1024^3 float32",
           "peak_threads": 1}
    text = cost_yardsticks(old)
    assert "MFU n/a" in text and text.endswith("1024^3 float32 matmul timed on the spot, 95.0 GFLOP/s, 1 thread")
