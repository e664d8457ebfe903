"""The first thing to run on a GPU this project gets: every GPU-only check, one JSON (``benchmarks/gpu_check.sh``).

    bash benchmarks/gpu_check.sh                      # on a CUDA machine: DeiT-S at 224 px, under 8 minutes
    bash benchmarks/gpu_check.sh --cpu --out x.json   # the same parts at cpu-demo shapes (CI runs this)

Parts, each in its own process with its own time limit (one that fails or times out is recorded and the rest go
on; the JSON is rewritten after each part, so an interrupted check keeps what it measured):

1. ``cuda_tests``: ``pytest tests/test_cuda.py`` (bf16 vs fp32, compile vs eager, a step under sync-debug
   "error", 2 GPUs vs 1 when there are 2) and the CUDA tests of the views;
2. ``bench_bf16_device_views``: ``synco doctor --bench`` of ``synco-imagenet-deit-s`` (bf16, views on the GPU);
3. ``bench_fp32_eager``: the same with ``precision=fp32``;
4. ``bench_compile``: the same with ``compile=true``, and ``graph_breaks``: torch._dynamo.explain of the three
   compiled parts (online and target encoders, the loss);
5. ``sync_debug``: host syncs per steady-state step (the workers' uint8 crops to the GPU, both views made there,
   the whole step) counted with ``torch.cuda.set_sync_debug_mode("warn")``, one process; on the CPU, the step run
   on the meta device instead, where any host read of a device value raises (0 or an error). Under DDP (2 GPUs)
   the CUDA tests run the trainer, not this count;
6. ``nccl_2gpu``: 2 GPUs x batch b against 1 GPU x batch 2b (with 2 GPUs; part of the CUDA tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_PRESET = "synco-imagenet-deit-s"


def run_part(cmd: list[str], timeout: int, json_out: Path | None = None) -> dict:
    """Run ``cmd``; its exit code, seconds, the tail of its output and, when it wrote one, its JSON."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        result = {"rc": done.returncode, "tail": (done.stdout + done.stderr)[-2000:]}
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        result = {"rc": None, "timed_out": timeout, "tail": out.decode(errors="replace")[-2000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    if json_out is not None and json_out.is_file():
        try:
            result["result"] = json.loads(json_out.read_text())
        except json.JSONDecodeError as e:
            result["result_error"] = str(e)
    return result


def pytest_counts(tail: str) -> dict:
    """``{"passed": n, "skipped": n, ...}`` from pytest's summary line."""
    last = tail.strip().splitlines()[-1] if tail.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}


def doctor(tmp: Path, name: str, preset: str, overrides: list[str], cpu: bool, timeout: int) -> dict:
    out = tmp / f"{name}.json"
    shapes = ["--steps", "3", "--warmup-steps", "2", "--batch-size", "8"] if cpu else []
    cmd = [sys.executable, "-m", "synco", "doctor", "--config", preset, "--bench", "--json", str(out), *shapes,
           *overrides]
    return run_part(cmd, timeout, out)


# --------------------------------------------------------------------------------------- in-process parts


def _model_and_inputs(cpu: bool):
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_OVERRIDES

    from synco.config import load_config
    from synco.models.method import create_model

    if cpu:
        cfg = load_config("cpu-demo", TINY_OVERRIDES + ["device=cpu", "precision=fp32"])
        device, batch = torch.device("cpu"), 8
    else:
        cfg = load_config(GPU_PRESET, ["data.root=/unused"])
        device, batch = torch.device("cuda"), 32
    model = create_model(cfg).to(device).train()
    size = cfg.data.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    return cfg, model, x


def part_graph_breaks(cpu: bool) -> dict:
    """Graph breaks of each compiled part (dynamo's explain: traced, not compiled, so it takes seconds)."""
    import torch
    import torch._dynamo

    from synco.losses import info_nce

    _, model, x = _model_and_inputs(cpu)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=not cpu):
        q1, q2 = model.online(x, x.flip(-1))
        k = torch.nn.functional.normalize(q2.float().detach(), dim=1)
        parts = {"online": (model.online, (x, x.flip(-1))), "target": (model.target, (x, x.flip(-1))),
                 "info_nce": (info_nce, (torch.nn.functional.normalize(q1.float(), dim=1), k, model.queue.queue2,
                                         0.2))}
        out = {}
        for name, (fn, args) in parts.items():
            torch._dynamo.reset()
            e = torch._dynamo.explain(fn)(*args)
            out[name] = {"graphs": e.graph_count, "graph_breaks": e.graph_break_count,
                         "reasons": sorted({str(r.reason)[:200] for r in e.break_reasons})}
    return out


def part_sync_debug(cpu: bool, steps: int = 5) -> dict:
    import warnings

    import torch

    from synco.engine.optim import create_optimizer
    from synco.engine.step import train_step

    cfg, model, x = _model_and_inputs(cpu)
    if cpu:  # the meta device: values do not exist there, so any host read raises
        import contextlib

        meta = torch.device("meta")
        model = model.to(meta)
        optimizer = torch.optim.AdamW(model.online.parameters(), lr=1e-3, foreach=False)
        xm = torch.empty(x.shape, device=meta)
        autocast, clip = torch.autocast, torch.nn.utils.clip_grad_norm_
        torch.autocast = lambda *a, **k: contextlib.nullcontext()
        torch.nn.utils.clip_grad_norm_ = lambda *a, **k: clip(*a, **{**k, "foreach": False})
        try:
            for _ in range(steps):
                train_step(model, model.online, optimizer, [(xm, xm)], use_synthetic=True, momentum=0.99,
                           clip_grad=1.0, bf16=False)
        finally:
            torch.autocast, torch.nn.utils.clip_grad_norm_ = autocast, clip
        return {"device": "meta (CPU mode)", "steps": steps, "host_reads": 0}
    from synco.data.batch_augment import BatchViews, sample_seeds
    from synco.data.transforms import view_params

    optimizer = create_optimizer(model, cfg.optim, 1e-4, x.device)
    step = dict(use_synthetic=True, momentum=0.99, clip_grad=cfg.optim.clip_grad, bf16=True)
    size, batch = cfg.data.image_size, x.shape[0]
    views = BatchViews(size, view_params(cfg.data.augment)).to(x.device)
    crops = torch.randint(0, 256, (batch, 2, 3, size, size), dtype=torch.uint8).pin_memory()  # as the loader's

    def one_step(k: int) -> None:  # the workers' crops to the GPU, both views made there, the whole step
        x1, x2 = views(crops.to(x.device, non_blocking=True), sample_seeds(0, k, torch.arange(batch)))
        train_step(model, model.online, optimizer, [(x1, x2)], **step)

    one_step(0)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for k in range(steps):
                one_step(k + 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"device": torch.cuda.get_device_name(), "steps": steps, "syncs_per_step": len(syncs) / steps,
            "messages": sorted(set(syncs))}


# ----------------------------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU mode: the same parts at cpu-demo shapes (CI)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: docs/results/gpu_check/<host>.json)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # run one in-process part, print its JSON
    args = ap.parse_args(argv)
    if args.part:  # one in-process part, in a process of its own (see _in_process)
        fn = {"graph_breaks": part_graph_breaks, "sync_debug": part_sync_debug}[args.part]
        args.out.write_text(json.dumps(fn(args.cpu), indent=2) + "\n")
        return 0
    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    out = args.out or ROOT / "docs" / "results" / "gpu_check" / f"{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem}-parts"
    tmp.mkdir(exist_ok=True)
    report = {"mode": "cpu" if cpu else "cuda", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not cpu else [],
              "parts": {}}
    preset = "cpu-demo" if cpu else GPU_PRESET
    limit = 120 if cpu else 240
    plan = [
        ("cuda_tests", lambda: run_part([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                         "tests/test_cuda.py", "tests/test_batch_augment.py", "-k",
                                         "cuda or test_cuda"], 300 if not cpu else limit)),
        ("bench_bf16_device_views", lambda: doctor(tmp, "bf16", preset, ["precision=bf16"] + ["device=cpu"] * cpu,
                                                   cpu, limit)),
        ("bench_fp32_eager", lambda: doctor(tmp, "fp32", preset, ["precision=fp32"] + ["device=cpu"] * cpu, cpu,
                                            limit)),
        ("graph_breaks", lambda: _in_process("graph_breaks", cpu, tmp, limit)),
        ("sync_debug", lambda: _in_process("sync_debug", cpu, tmp, limit)),
    ]
    if not cpu:
        plan.insert(3, ("bench_compile", lambda: doctor(tmp, "compile", preset, ["compile=true"], cpu, 300)))
    for name, part in plan:
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        report["parts"][name] = part()
        if name == "cuda_tests":
            report["parts"][name]["counts"] = pytest_counts(report["parts"][name]["tail"])
        out.write_text(json.dumps(report, indent=2) + "\n")
    report["parts"]["nccl_2gpu"] = ({"in": "cuda_tests (test_two_gpus_equal_one_gpu_with_double_batch)"}
                                    if torch.cuda.device_count() >= 2 else {"skipped": "fewer than 2 GPUs"})
    report["ok"] = all(p.get("rc", 0) == 0 for p in report["parts"].values())
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: wrote {out} ({'all parts ran' if report['ok'] else 'some parts failed'})", file=sys.stderr)
    return 0 if report["ok"] else 1


def _in_process(part: str, cpu: bool, tmp: Path, timeout: int) -> dict:
    out = tmp / f"{part}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out)] + ["--cpu"] * cpu
    return run_part(cmd, timeout, out)


if __name__ == "__main__":
    sys.exit(main())
