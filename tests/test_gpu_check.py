"""benchmarks/gpu_check.sh in its CPU mode: every part runs and the JSON holds what each measured, so the script
the first GPU runs cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow  # five short subprocesses: about 30 s


def test_gpu_check_cpu_mode_writes_every_part(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                                       "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and report["ok"] is True
    parts = report["parts"]
    assert set(parts) >= {"cuda_tests", "bench_bf16_device_views", "bench_fp32_eager", "graph_breaks", "sync_debug",
                          "nccl_2gpu"}
    assert parts["cuda_tests"]["counts"].get("skipped", 0) >= 1 and "failed" not in parts["cuda_tests"]["counts"]
    for name, precision in (("bench_bf16_device_views", "bf16"), ("bench_fp32_eager", "fp32")):
        bench = parts[name]["result"]["bench"]
        assert bench["precision"] == precision and bench["images_per_second"] > 0 and bench["step_ms_median"] > 0
    assert parts["bench_bf16_device_views"]["result"]["bench"]["inputs"] == "views"  # cpu-demo makes views on device
    for compiled in ("online", "target", "info_nce"):
        assert parts["graph_breaks"]["result"][compiled]["graph_breaks"] == 0
    assert parts["sync_debug"]["result"]["host_reads"] == 0
