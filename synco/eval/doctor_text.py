"""`synco doctor`'s report in words: one labelled line (or a few) per section of the report dict."""

from __future__ import annotations

from typing import Optional


def _yes(flag) -> str:
    return "yes" if flag else "no"


def _failed(section) -> Optional[str]:
    return f"probe failed ({section['error']})" if isinstance(section, dict) and "error" in section else None


def _cuda_tuple(version: Optional[str]) -> tuple:
    try:
        return tuple(int(x) for x in str(version).split(".")[:2])
    except ValueError:
        return ()


def _versions_text(v: dict) -> str:
    arch = " ".join(v["cuda_arch_list"]) or "none"
    build = f"built for CUDA {v['cuda_build']}, cuDNN {v['cudnn']}; kernels for {arch}" if v["cuda_build"] else \
        "a CPU-only build"
    return (f"Python {v['python']}, torch {v['torch']} ({build}), torchvision {v['torchvision']}, "
            f"timm {v['timm']}, synco {v['synco']}")


def _driver_text(d: dict, cuda_build: Optional[str]) -> str:
    if not d["found"]:
        return "no NVIDIA driver found (no nvidia-smi on PATH, no loadable libcuda.so.1)"
    text = f"{d['version'] or 'version unknown'}"
    if d["supports_cuda"]:
        text += f", supports CUDA up to {d['supports_cuda']}"
        if cuda_build and _cuda_tuple(d["supports_cuda"]) < _cuda_tuple(cuda_build):
            text += (f": older than this torch's CUDA {cuda_build}. Update the driver, or install a torch built for "
                     f"CUDA {d['supports_cuda']} or older")
    return text


def _gpu_lines(g: dict) -> list[str]:
    if not g["usable"]:
        return [f"none usable: {g['reason']}"]
    lines = []
    for d in g["devices"]:
        sheet, fp32 = d["datasheet_bf16"], d["datasheet_fp32"]
        peaks = (f"datasheet {(sheet or fp32)['gpu']}: dense bf16 {sheet['tflops'] if sheet else 'n/a'}, fp32 "
                 f"{fp32['tflops']} TFLOPS" if fp32 else "not in the datasheet table: MFU n/a")
        lines.append(f"{d['index']}: {d['name']}, {d['memory_gib']:.1f} GiB ({d['free_gib']:.1f} free), compute "
                     f"capability {d['compute_capability']}, {d['multiprocessors']} SMs, bf16 {_yes(d['bf16'])}, "
                     f"kernels in this torch {_yes(d['kernels_in_this_torch'])}; {peaks}")
    return lines


def _attention_text(a: dict) -> str:
    allowed = ", ".join(f"{k.replace('_', '-')} {_yes(v)}" for k, v in a["sdp_enabled"].items())
    if not a.get("attention_modules"):
        return f"{a['backbone']}: no timm attention blocks found; torch allows SDPA kernels: {allowed}"
    text = (f"{a['backbone']}: {a['fused_modules']} of {a['attention_modules']} attention blocks call "
            f"F.scaled_dot_product_attention (timm fused_attn); {a['heads']} heads x {a['head_dim']}, "
            f"{a['tokens']} tokens")
    if a.get("kernel_probe"):
        text += f"; on {a['kernel_probe']} that runs {a['kernel']}"
    elif a["kernel"]:
        text += f"; {a['kernel']}"
    else:
        text += "; no kernel probed: the run would stop"
    return f"{text}. torch allows: {allowed}"


def _cpu_text(c: dict) -> str:
    per_gpu = f"{c['cores_per_gpu']:.1f} cores per GPU" if c["cores_per_gpu"] else "no GPU: cores per GPU n/a"
    return (f"{c['usable']} usable cores of {c['total']}, {c['name']}; {per_gpu}; the preset's DataLoader "
            f"workers: {c['preset_workers_per_process']} per process")


def _shm_text(s: dict) -> str:
    if s["free_gib"] is None:
        return f"{s['path']} not found"
    text = f"{s['free_gib']:.1f} GiB free of {s['total_gib']:.1f} GiB"
    if s["low"]:
        text += (": low. DataLoader workers hand batches over through it; give a container more "
                 "(docker run --shm-size=16g, or --ipc=host)")
    return text


def _run_text(r: dict) -> str:
    return f"{r['preset']} (device={r['device_setting']}, precision={r['precision_setting']}): {r['verdict']}"


def _threads(n: Optional[int]) -> str:
    return "" if n is None else f", {n} thread{'' if n == 1 else 's'}"


def _bench_lines(b: dict) -> list[str]:
    threads = _threads(b["threads"])
    lines = [f"{b['method']} / {b['backbone']} at {b['image_size']} px, batch {b['batch_size']}, {b['precision']}, "
             f"{'compiled' if b['compile'] else 'eager'}{threads} on {b['device']}; "
             + ("random uint8 crops made into both views on the device (data.augment.on=device), then"
                if b.get("inputs") == "views" else "random inputs through")
             + " the trainer's step (synco.engine.step.train_step)"]
    if b["note"]:
        lines.append(b["note"])
    lines.append(f"{b['steps']} timed step{'' if b['steps'] == 1 else 's'} after {b['warmup_steps']} warm-up "
                 "(and 1 whose FLOPs were counted): "
                 f"step {b['step_ms_median']:.1f} ms median (mean {b['step_ms_mean']:.1f}), "
                 f"{b['images_per_second']:,.1f} images/s")
    lines.append(f"peak memory {b['peak_memory_mb']:,.0f} MB ({b['memory_kind']}); "
                 f"{b['flops_per_step'] / 1e9:,.2f} GFLOP per step, {b['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s "
                 "at the median step")
    sheet = b["datasheet"]
    if sheet:
        lines.append(f"MFU {100 * b['mfu']:.1f}% of the {sheet['gpu']} datasheet's dense {sheet['dtype']} peak "
                     f"({sheet['tflops']:g} TFLOPS; {sheet['source']})")
    elif b["device"].startswith("cpu"):
        lines.append("MFU n/a: a CPU has no datasheet peak (its rate depends on the cores, vector units and clocks "
                     "it is given)")
    else:
        lines.append(f"MFU n/a: {b['device']} in {b['compute_dtype']} is not in the datasheet table "
                     "(synco.eval.meters.GPU_PEAKS)")
    lines.append(f"on-the-spot {b['matmul_shape']} matmul (timed here{_threads(b['matmul_threads'])}; not a "
                 f"datasheet): {b['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s; the step reaches "
                 f"{100 * b['matmul_utilization']:.0f}% of it")
    return lines


def render(report: dict) -> str:
    """The report as the terminal shows it: one labelled line (or a few) per section."""
    v = report["versions"]
    sections = [
        ("versions", lambda: [_versions_text(v)], v),
        ("driver", lambda: [_driver_text(report["driver"], v.get("cuda_build"))], report["driver"]),
        ("GPUs", lambda: _gpu_lines(report["gpus"]), report["gpus"]),
        ("NCCL", lambda: [_nccl_text(report["nccl"])], report["nccl"]),
        ("attention", lambda: [_attention_text(report["attention"])], report["attention"]),
        ("/dev/shm", lambda: [_shm_text(report["shm"])], report["shm"]),
        ("CPU", lambda: [_cpu_text(report["cpu"])], report["cpu"]),
        ("run", lambda: [_run_text(report["run"])], report["run"]),
    ]
    if "bench" in report:
        sections.append(("bench", lambda: _bench_lines(report["bench"]), report["bench"]))
    out = [f"synco doctor: what a run of {report['preset']} would get on this machine"]
    for label, lines, section in sections:
        failed = _failed(section)
        for i, line in enumerate([failed] if failed else lines()):
            out.append(f"  {label if i == 0 else '':<10} {line}")
    return "\n".join(out)


def _nccl_text(n: dict) -> str:
    if not n["in_this_torch"]:
        return "not in this torch: a multi-GPU run (synco uses NCCL on GPUs) cannot start"
    usable = "usable" if n["usable"] else "not usable here (it needs a CUDA GPU)"
    return f"{n['version']} in this torch; {usable}"
