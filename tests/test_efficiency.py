"""Efficiency benchmark (Table 15): equal parameter counts across methods, sane time and memory numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from synco.errors import SyncoError
from synco.eval.efficiency import EfficiencyOptions, count_parameters, efficiency_table, run_efficiency
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
                             device="cpu", epoch_images=1600, isolate=False)
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
    with pytest.raises(SyncoError, match="multiple of the batch"):  # checked before anything is measured
        run_efficiency(None, EfficiencyOptions(methods=["byol", "moby"], batch_size=48, steps=1, device="cpu"),
                       SMALL, log=lambda s: None)


def test_isolated_measurement_in_a_fresh_process(result):
    # On CPU the default: each method measured in a spawned process (same start for every method).
    opts = EfficiencyOptions(methods=["byol"], batch_size=16, steps=1, warmup_steps=0, device="cpu", threads=1)
    res = run_efficiency(None, opts, SMALL, log=lambda s: None)
    assert res["isolated"] and res["methods"]["byol"]["total_params"] == result[0]["methods"]["byol"]["total_params"]
    assert res["methods"]["byol"]["peak_mem_mb"] > 0 and res["methods"]["byol"]["step_ms"] > 0


def test_cli_efficiency(tmp_path, capsys):
    from synco.cli.main import main

    rc = main(["eval", "efficiency", "--methods", "moby,synco", "--steps", "1", "--batch-size", "16",
               "--out", str(tmp_path), "warmup_steps=0", "device=cpu", "isolate=false", *SMALL])
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
    assert math.isfinite(peak["peak_flops_per_s"]) and peak["peak_flops_per_s"] > 1e7
    assert peak["peak_matmul"] == "256^3 float32" and peak["peak_threads"] == 1


def test_flop_and_mfu_report(result):
    res, _ = result
    rows = res["methods"]
    for method, r in rows.items():
        for key in ("flops_per_step", "flops_per_image", "achieved_flops_per_s", "peak_flops_per_s", "mfu",
                    "mfu_model"):
            assert math.isfinite(r[key]) and r[key] > 0, (method, key)
        assert r["flops_per_image"] == pytest.approx(r["flops_per_step"] / 16)
        assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / (r["step_ms"] / 1000))
        assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / r["peak_flops_per_s"])
        assert r["mfu"] <= r["mfu_model"] < 10
        parts = r["flops_by_part"]
        assert sum(parts.values()) == r["flops_per_step"]
        assert parts["online"] > 2 * parts["target"] > 0  # forward + backward against a forward
        assert set(r["breakdown_ms"]) == set(PARTS) and all(v >= 0 for v in r["breakdown_ms"].values())
        # the marks cover the whole step, so the parts add up to it
        assert sum(r["breakdown_ms"].values()) == pytest.approx(r["step_ms"], rel=0.05)
        assert r["breakdown_ms"]["online forward"] > 0 and r["breakdown_ms"]["backward"] > 0
        assert sum(r["breakdown_share"].values()) == pytest.approx(1, rel=0.05)
    # synthetic negatives: a part of synco's step only, with FLOPs of their own (the similarity to the queue and
    # the logits against them); BYOL has no queue at all
    assert rows["synco"]["breakdown_ms"]["synthetic negatives"] > 0
    assert rows["moby"]["breakdown_ms"]["synthetic negatives"] == 0
    assert rows["byol"]["breakdown_ms"]["synthetic negatives"] == 0
    assert rows["synco"]["flops_per_step"] > rows["moby"]["flops_per_step"] > rows["byol"]["flops_per_step"]
    table = efficiency_table(res)
    assert "MFU" in table and "GFLOP/step" in table and "synthetic negatives (%)" in table
    assert "1024^3 float32" in table


def test_breakdown_with_the_training_data_pipeline(result):
    """inputs=loader: batches come from the preset's pipeline, so the step waits for data; FLOPs stay the model's."""
    opts = EfficiencyOptions(methods=["moby"], batch_size=16, steps=2, warmup_steps=0, device="cpu", isolate=False,
                             inputs="loader", epoch_images=1600)
    res = run_efficiency(None, opts, SMALL + ["data.num_workers=0"], log=lambda s: None)
    r = res["methods"]["moby"]
    assert r["inputs"] == "loader" and r["breakdown_ms"]["data wait"] > 0
    assert r["flops_per_step"] == result[0]["methods"]["moby"]["flops_per_step"]  # no augmentation FLOPs counted
    assert r["mfu"] < r["mfu_model"]
    with pytest.raises(SyncoError, match="inputs"):
        run_efficiency(None, EfficiencyOptions(methods=["moby"], inputs="disk"), SMALL, log=lambda s: None)


def test_isolated_measurement_may_start_dataloader_workers():
    """Each method runs in a spawned child; with inputs=loader and worker processes the child starts its own
    children, which a daemonic process may not (it crashed with a traceback)."""
    opts = EfficiencyOptions(methods=["byol"], batch_size=16, steps=1, warmup_steps=0, device="cpu", isolate=True,
                             inputs="loader", epoch_images=1600, flops=False)
    res = run_efficiency(None, opts, SMALL + ["data.num_workers=1", "data.augment.on=workers"], log=lambda s: None)
    assert res["isolated"] and res["methods"]["byol"]["breakdown_ms"]["data wait"] > 0
