"""How a robustness result reads: the Table 13 row and the Markdown tables `synco eval robustness` prints."""

from __future__ import annotations

from .benchmarks import BENCHMARKS
from .corruptions import FAMILY_OF
from .results import markdown_table


def table13_row(results: dict) -> dict:
    """The Table 13 columns (IN, MF, T-0.7, TI, IN-C, IN-A, IN-W, IN-S, IN-R, IN-O); None where not run."""
    return {s.column: None if results.get(s.key) is None else float(results[s.key][s.metric]) for s in BENCHMARKS}


def robustness_tables(summary: dict) -> str:
    """One row per benchmark; for ImageNet-C also per corruption, per family and per severity; the Table 13 row."""
    res, parts = summary["results"], []
    rows = []
    for spec in BENCHMARKS:
        r = res.get(spec.key)
        if r is None:
            rows.append({"benchmark": spec.column, "images": None, "metric": None,
                         "value": None, "note": "skipped: " + summary["skipped"].get(spec.key, "not requested")})
        elif spec.metric == "fpr95":
            rows.append({"benchmark": spec.column, "images": r["n_ood"], "metric": "FPR95 (%) ↓",
                         "value": r["fpr95"], "note": f"AUROC {r['auroc']:.2f}"})
        else:
            note = r.get("source") or ("logits restricted to the classes present" if r.get("masked") else "")
            rows.append({"benchmark": spec.column, "images": r["n"], "metric": "top-1 (%)", "value": r["top1"],
                         "note": note})
    parts.append(markdown_table(rows, ["benchmark", "images", "metric", "value", "note"]))
    c = res.get("imagenet_c")
    if c is not None:
        sevs = sorted({s for per in c["per_corruption"].values() for s in per}, key=int)
        crow = [{"family": FAMILY_OF[name], "corruption": name, **{f"s{s}": per.get(s) for s in sevs},
                 "mean": c["corruption_mean"][name]} for name, per in c["per_corruption"].items()]
        parts.append(markdown_table(crow, ["family", "corruption", *[f"s{s}" for s in sevs], "mean"]))
        frow = {"clean": res.get("clean", {}).get("top1"), **c["per_family"], "IN-C mean": c["top1"]}
        parts.append(markdown_table([frow], list(frow)))
        srow = {"clean": res.get("clean", {}).get("top1"), **{f"severity {s}": v for s, v in c["per_severity"].items()}}
        parts.append(markdown_table([srow], list(srow)))
    row = summary["table13"]
    parts.append("Table 13 row:\n" + markdown_table([{k: (v if v is not None else "—") for k, v in row.items()}],
                                                    list(row)))
    return "\n\n".join(parts)
