"""`synco doctor`: the environment report, its JSON, the short bench, the datasheet peaks, and its errors.

Every config here pins device=cpu and precision=fp32, so a machine with a GPU runs the same tests; nothing
asserts on a timing (only that measured numbers exist, are finite and positive, and relate by definition)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from synco.cli.main import main
from synco.config import load_config
from synco.eval import doctor, doctor_probes, doctor_text
from synco.eval.meters import GPU_PEAKS, datasheet_gpu, datasheet_peak

CPU_FP32 = ["device=cpu", "precision=fp32"]
# cpu-demo made smaller: a 1-block ViT and narrow heads keep a bench to a few seconds.
TINY = [*CPU_FP32, "model.backbone_kwargs={img_size: 16, patch_size: 4, embed_dim: 48, depth: 1, num_heads: 2}",
        "model.proj_hidden=64", "model.pred_hidden=64", "model.proj_dim=32", "contrast.queue_size=256",
        "negatives.n_hard=16", "negatives.counts=[8, 8, 8, 8, 8, 8]"]
# The DeiT-S GPU preset with a 1-block, 32 px backbone: its CPU fallback path in seconds.
TINY_GPU_PRESET = [*CPU_FP32,
                   "model.backbone_kwargs={img_size: 32, patch_size: 16, embed_dim: 48, depth: 1, num_heads: 2}",
                   "data.image_size=32", "model.proj_hidden=64", "model.pred_hidden=64", "model.proj_dim=32",
                   "contrast.queue_size=256", "negatives.n_hard=16", "negatives.counts=[8, 8, 8, 8, 8, 8]"]
SECTIONS = ("versions", "driver", "GPUs", "NCCL", "attention", "/dev/shm", "CPU", "run")
JSON_KEYS = {"preset", "versions", "driver", "gpus", "nccl", "attention", "shm", "cpu", "run"}


def test_doctor_prints_every_section_and_exits_0(capsys):
    assert main(["doctor", *CPU_FP32]) == 0
    out = capsys.readouterr().out
    assert out.startswith("synco doctor: what a run of cpu-demo would get on this machine")
    labels = [line.split()[0] for line in out.splitlines()[1:] if line.startswith("  ") and line[2] != " "]
    assert labels == list(SECTIONS)
    assert "probe failed" not in out
    assert f"torch {torch.__version__}" in out and "runs on the CPU in fp32" in out
    assert "4 of 4 attention blocks call F.scaled_dot_product_attention" in out  # cpu-demo's 4-block ViT


def test_json_report_is_written_atomically_with_every_section(tmp_path, capsys):
    target = tmp_path / "new" / "doctor.json"  # the folder is created
    assert main(["doctor", "--json", str(target), *CPU_FP32]) == 0
    report = json.loads(target.read_text())
    assert set(report) == JSON_KEYS
    assert report["versions"]["torch"] == torch.__version__ and report["cpu"]["usable"] >= 1
    assert report["run"] == {**report["run"], "device": "cpu", "precision": "fp32", "would_stop": False}
    assert report["shm"]["path"] == "/dev/shm" and "flash" in report["attention"]["sdp_enabled"]
    assert [p.name for p in target.parent.iterdir()] == ["doctor.json"]  # no temp file left behind
    assert "report written to" in capsys.readouterr().err


def test_bench_on_cpu_demo_reports_finite_positive_numbers(tmp_path, capsys):
    target = tmp_path / "doctor.json"
    rc = main(["doctor", "--bench", "--steps", "2", "--warmup-steps", "0", "--batch-size", "16", "--json",
               str(target), *TINY])
    assert rc == 0
    b = json.loads(target.read_text())["bench"]
    assert (b["preset"], b["method"], b["batch_size"], b["image_size"], b["steps"]) == ("cpu-demo", "synco", 16, 16, 2)
    assert not b["cpu_fallback"] and b["note"] is None and b["precision"] == "fp32" and b["threads"] == 1
    for key in ("images_per_second", "step_ms_median", "step_ms_mean", "peak_memory_mb", "flops_per_step",
                "achieved_flops_per_s", "matmul_flops_per_s", "matmul_utilization"):
        assert math.isfinite(b[key]) and b[key] > 0, key
    # by definition, not by two clocks agreeing: images/s and FLOP/s are at the median step
    assert b["images_per_second"] == pytest.approx(16 / (b["step_ms_median"] / 1000))
    assert b["achieved_flops_per_s"] == pytest.approx(b["flops_per_step"] / (b["step_ms_median"] / 1000))
    assert b["datasheet"] is None and b["mfu"] is None  # a CPU has no datasheet peak: none is made up
    assert b["measurement"]["flops_per_step"] == b["flops_per_step"] and b["measurement"]["synthetic"]
    out = capsys.readouterr().out
    assert "bench" in out and "MFU n/a: a CPU has no datasheet peak" in out and "timed here" in out
    assert "CPU fallback" not in out


def test_bench_of_a_gpu_preset_on_the_cpu_says_it_is_a_fallback(capsys):
    report = doctor.run_doctor("synco-imagenet-deit-s", TINY_GPU_PRESET, bench_run=True, steps=1, warmup_steps=0,
                               log=print)
    b = report["bench"]
    assert b["cpu_fallback"] and b["batch_size"] == doctor.CPU_FALLBACK_BATCH and b["preset_batch_size"] == 128
    assert b["backbone"] == "deit_small_patch16_224" and b["flops_per_step"] > 0
    assert "CPU fallback: synco-imagenet-deit-s is a GPU preset and device=cpu forces the CPU" in b["note"]
    assert "not the preset's on a GPU" in capsys.readouterr().out


def test_bench_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["doctor", "--bench", "--steps", "1", *TINY]) == 2
    assert "does not time DDP" in capsys.readouterr().err


# --- datasheet peaks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, gpu, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4, 66.9),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 51.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5, 60.0),
    ("NVIDIA H200", "H200 SXM", 989.4, 66.9),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5, 60.0),
    ("NVIDIA GH200 480GB", "GH200", 989.4, 66.9),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM", 312.0, 19.5),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM", 312.0, 19.5),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe", 312.0, 19.5),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", 312.0, 19.5),
    ("NVIDIA L40S", "L40S", 362.05, 91.6),
    ("NVIDIA L40", "L40", 181.05, 90.5),
    ("NVIDIA L4", "L4", 121.0, 30.3),
    ("NVIDIA A10", "A10", 125.0, 31.2),
    ("NVIDIA A30", "A30", 165.0, 10.3),
    ("NVIDIA RTX A6000", "RTX A6000", 154.8, 38.7),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2, 82.6),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", 71.0, 35.6),
    ("Tesla V100-SXM2-16GB", "V100 SXM2", None, 15.7),
    ("Tesla V100-PCIE-32GB", "V100 PCIe", None, 14.0),
    ("Tesla V100S-PCIE-32GB", "V100S PCIe", None, 16.4),
    ("Tesla T4", "T4", None, 8.1),
])
def test_datasheet_peak_of_known_gpus(name, gpu, bf16, fp32):
    assert datasheet_gpu(name).name == gpu
    peak = datasheet_peak(name, "bf16")
    if bf16 is None:  # V100 and T4 have no bf16 units: no bf16 MFU rather than a wrong one
        assert peak is None
    else:
        assert peak["gpu"] == gpu and peak["tflops"] == bf16 and peak["peak_flops_per_s"] == pytest.approx(bf16 * 1e12)
    assert datasheet_peak(name, "fp32")["tflops"] == fp32


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D",
                                  "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA B200", "AMD Instinct MI300X",
                                  "Tesla V100-SXM3-32GB", "cpu", ""])
def test_datasheet_peak_of_unknown_devices_is_none(name):
    assert datasheet_gpu(name) is None and datasheet_peak(name, "bf16") is None and datasheet_peak(name, "fp32") is None


def test_datasheet_table_is_consistent():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "tf32")["tflops"] == 494.7
    for g in GPU_PEAKS:
        assert g.source and g.fp32 > 0
        if g.bf16 is not None:  # tensor cores: bf16 at twice TF32, and above the plain FP32 rate
            assert g.tf32 == pytest.approx(g.bf16 / 2, rel=0.02) and g.bf16 > g.fp32


@pytest.mark.parametrize("arch, cc, ok", [
    (["sm_80", "sm_90"], (8, 6), True),  # sm_80 machine code runs on 8.6 (same major)
    (["sm_75", "sm_80", "sm_90"], (7, 0), False),  # V100 with a wheel that dropped Volta
    (["sm_80"], (9, 0), False),
    (["sm_90a"], (9, 0), True),
    (["sm_80", "compute_90"], (10, 0), True),  # PTX of an older arch: the driver compiles it
    ([], (9, 0), False),
])
def test_which_gpus_a_torch_build_has_kernels_for(arch, cc, ok):
    assert doctor_probes.has_kernels(arch, *cc) is ok


def test_cudnn_versions_read_as_released():
    assert (doctor_probes._cudnn_version(92400), doctor_probes._cudnn_version(90100), doctor_probes._cudnn_version(8902)) == \
        ("9.24.0", "9.1.0", "8.9.2")


# --- what the report says about a GPU machine (rendered from its data; no GPU here) -------------------------


def test_gpu_preset_without_cuda_would_stop(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config("synco-imagenet-deit-s", ["precision=fp32"], needs_data=False)
    verdict = doctor_probes.preset_verdict("synco-imagenet-deit-s", cfg)
    assert verdict["gpu_preset"] and verdict["would_stop"] and verdict["device"] is None
    assert "would stop before any work (exit 2)" in verdict["verdict"] and "device=cpu" in verdict["verdict"]
    forced = doctor_probes.preset_verdict("synco-imagenet-deit-s",
                                          load_config("synco-imagenet-deit-s", CPU_FP32, needs_data=False))
    assert not forced["would_stop"] and "device=cpu forces it" in forced["verdict"]
    demo = doctor_probes.preset_verdict("cpu-demo", load_config("cpu-demo", CPU_FP32))
    assert not demo["gpu_preset"] and not demo["would_stop"]


def test_gpu_lines_driver_and_mfu_are_rendered():
    sheet = datasheet_peak("NVIDIA H100 80GB HBM3", "bf16")
    gpus = {"usable": True, "devices": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1,
                                         "free_gib": 78.6, "compute_capability": "9.0", "multiprocessors": 132,
                                         "bf16": True, "kernels_in_this_torch": True, "datasheet_bf16": sheet,
                                         "datasheet_fp32": datasheet_peak("NVIDIA H100 80GB HBM3", "fp32")}]}
    (line,) = doctor_text._gpu_lines(gpus)
    assert "compute capability 9.0" in line and "datasheet H100 SXM: dense bf16 989.4, fp32 66.9 TFLOPS" in line
    old = doctor_text._driver_text({"found": True, "version": "535.104.05", "supports_cuda": "12.2"}, "13.0")
    assert "older than this torch's CUDA 13.0" in old
    assert "older" not in doctor_text._driver_text({"found": True, "version": "580.65", "supports_cuda": "13.0"}, "13.0")
    bench = {"method": "synco", "backbone": "deit_small_patch16_224", "image_size": 224, "batch_size": 128,
             "precision": "bf16", "compile": True, "threads": None, "device": "NVIDIA H100 80GB HBM3", "note": None,
             "steps": 10, "warmup_steps": 3, "step_ms_median": 100.0, "step_ms_mean": 101.0,
             "images_per_second": 1280.0, "peak_memory_mb": 20000.0, "memory_kind": "cuda max_memory_allocated",
             "flops_per_step": 4.0e13, "achieved_flops_per_s": 4.0e14, "compute_dtype": "bf16", "datasheet": sheet,
             "mfu": 4.0e14 / sheet["peak_flops_per_s"], "matmul_shape": "8192^3 bfloat16", "matmul_threads": None,
             "matmul_flops_per_s": 7.0e14, "matmul_utilization": 4.0 / 7.0}
    text = "\n".join(doctor_text._bench_lines(bench))
    assert "MFU 40.4% of the H100 SXM datasheet's dense bf16 peak (989.4 TFLOPS" in text and "compiled" in text
    assert "8192^3 bfloat16 matmul (timed here; not a datasheet)" in text


def test_attention_of_the_presets_backbones():
    demo = doctor_probes.attention(load_config("cpu-demo", CPU_FP32).model, torch.device("cpu"), bf16=False)
    assert (demo["attention_modules"], demo["fused_modules"], demo["heads"], demo["head_dim"], demo["tokens"]) == \
        (4, 4, 3, 32, 17)  # 16 px / 4 px patches = 16 tokens and [CLS]
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        assert demo["kernel"] == "CPU flash attention"
    swin = doctor_probes.attention(load_config("synco-imagenet-swin-t", CPU_FP32, needs_data=False).model,
                            torch.device("cpu"), bf16=False)
    if not swin["timm_fused_attn_experimental"]:  # timm keeps Swin's fused attention off unless TIMM_FUSED_ATTN=2
        assert swin["fused_modules"] == 0 and swin["kernel"].startswith("none: timm computes")
    assert swin["tokens"] == 49  # a 7 x 7 window


# --- bad inputs: one paragraph, exit 2, no traceback ---------------------------------------------------------


def _bad_inputs(tmp_path) -> list[list[str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [["--config", "no-such-preset"], ["no_such_key=1"], ["epochs=many"], ["--json", str(tmp_path)],
            ["--json", str(a_file / "doctor.json")], ["--json", "/proc/doctor.json"], ["--steps", "2"],
            ["--bench", "--steps", "0"], ["--bench", "--batch-size", "7", *TINY]]


def test_bad_inputs_exit_2_with_one_paragraph(tmp_path, capsys):
    for args in _bad_inputs(tmp_path):
        assert main(["doctor", *args, *CPU_FP32]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("synco: error: ") and err.count("\n") == 1 and "Traceback" not in err, (args, err)


def test_console_command_bad_preset_has_no_traceback():
    run = subprocess.run([sys.executable, "-m", "synco", "doctor", "--config", "no-such-preset", *CPU_FP32],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "unknown preset 'no-such-preset'" in run.stderr
