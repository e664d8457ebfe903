"""The tables of `synco eval efficiency` (efficiency.py): parameters, memory and time per method, then what a
step costs against the limit (FLOPs, MFU) and where it goes."""

from __future__ import annotations

from typing import Optional

from .meters import PARTS
from .results import markdown_table


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def efficiency_table(result: dict) -> str:
    epochs = [int(e) for e in result["options"]["epochs"]]
    cols = ["Method", "Total Params", "Trainable Params", "Avg Mem (MB)", "Peak Mem (MB)", "Peak - Before (MB)",
            "Step (ms)", "Images/s",
            "Time/Epoch (min)", *[f"{e} Ep. (h)" for e in epochs]]
    rows = []
    for method, r in result["methods"].items():
        rows.append({"Method": method, "Total Params": _millions(r["total_params"]),
                     "Trainable Params": f"{_millions(r['trainable_params'])} ({r['trainable_pct']:.2f}%)",
                     "Avg Mem (MB)": r["avg_mem_mb"], "Peak Mem (MB)": r["peak_mem_mb"],
                     "Peak - Before (MB)": r["peak_over_before_mb"], "Step (ms)": r["step_ms"],
                     "Images/s": r["images_per_s"], "Time/Epoch (min)": r["epoch_min"],
                     **{f"{e} Ep. (h)": r[f"hours_{e}"] for e in epochs}})
    head = (f"{result['backbone']} on {result['device']}; memory: {result['memory']} (Peak - Before: above the "
            f"memory in use before the method's model was built); "
            f"{'each method in a fresh process; ' if result.get('isolated') else ''}"
            f"epoch = {result['epoch_images']} images ({result['epoch_images_source']})")
    text = head + "\n" + markdown_table(rows, cols)
    return text + "\n\n" + cost_table(result)


def _percent(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def cost_table(result: dict) -> str:
    """FLOPs and MFU of one step, and the share of the step each part takes."""
    methods = result["methods"]
    first = next(iter(methods.values()))
    parts = [p for p in PARTS if any(r["breakdown_ms"].get(p, 0.0) > 0 for r in methods.values())] or list(PARTS)
    cols = ["Method", "Step (ms)"]
    if "flops_per_step" in first:
        cols += ["GFLOP/step", "GFLOP/s", "MFU", "MFU (model only)", "of matmul here"]
    cols += [f"{p} (%)" for p in parts]
    rows = []
    for method, r in methods.items():
        row = {"Method": method, "Step (ms)": r["step_ms"]}
        if "flops_per_step" in r:
            r = _current_keys(r)
            row.update({"GFLOP/step": r["flops_per_step"] / 1e9, "GFLOP/s": r["achieved_flops_per_s"] / 1e9,
                        "MFU": _percent(r.get("mfu")), "MFU (model only)": _percent(r.get("mfu_model")),
                        "of matmul here": _percent(r.get("matmul_utilization"))})
        row.update({f"{p} (%)": 100.0 * r["breakdown_share"][p] for p in parts})
        rows.append(row)
    head = (f"Cost against the limit (FLOPs: torch.utils.flop_counter, forward + backward; {cost_yardsticks(first)}; "
            f"inputs: {first.get('inputs', 'random')}; parts as % of the step, which they add up to)")
    return head + "\n" + markdown_table(rows, cols)


def _current_keys(row: dict) -> dict:
    """A row of an efficiency.json written before MFU was stated against the datasheet: its "mfu" was the fraction
    of the matmul timed on the spot, so it is shown as that, and its MFU as unknown."""
    if "datasheet" in row or "peak_flops_per_s" not in row:
        return row
    return {**row, "datasheet": None, "mfu": None, "mfu_model": None, "matmul_utilization": row.get("mfu"),
            "matmul_flops_per_s": row["peak_flops_per_s"], "matmul_shape": row.get("peak_matmul"),
            "matmul_threads": row.get("peak_threads")}


def cost_yardsticks(row: dict) -> str:
    """What MFU and the secondary matmul fraction of a row are measured against, in words."""
    if "flops_per_step" not in row:
        return "FLOPs not counted"
    row = _current_keys(row)
    sheet = row.get("datasheet")
    mfu = (f"MFU against the {sheet['gpu']} datasheet's dense {sheet['dtype']} peak, {sheet['tflops']:g} TFLOPS"
           if sheet else "MFU n/a: no datasheet peak for this device (a CPU, or a GPU not in meters.GPU_PEAKS)")
    if "matmul_flops_per_s" not in row:
        return mfu
    threads = row.get("matmul_threads")
    return (f"{mfu}; 'of matmul here': against a {row['matmul_shape']} matmul timed on the spot, "
            f"{row['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s"
            f"{'' if threads is None else f', {threads} thread' + ('' if threads == 1 else 's')}")
