"""Acceptance numbers of Tables 13-15 on a checkpoint + linear head (default: digits on CPU).

    python benchmarks/robust_acceptance.py --checkpoint runs/cpu-demo --linear-head runs/cpu-demo/eval \
        --out runs/cpu-demo/eval/robust [--max-images N] [--attacks fgsm,pgd,...] [key=value ...]

Runs, in one process, the same commands a user would type:

    synco eval robustness  --checkpoint CKPT --linear-head HEAD --out OUT dataset=digits num_workers=0
    synco eval adversarial --checkpoint CKPT --linear-head HEAD --out OUT dataset=digits num_workers=0
    synco eval efficiency  --preset PRESET --out OUT

and writes OUT/acceptance.md with the three tables (robustness: clean vs corruption families and severities;
adversarial: clean and every attack; efficiency: synco / moby / byol). Extra key=value pairs go to the
robustness and adversarial commands (e.g. device=cpu batch_size=128).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    from synco.cli.main import main as synco
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synco.cli.main import main as synco


def _run(argv: list[str]) -> float:
    print("$ synco " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    rc = synco(argv)
    if rc != 0:
        raise SystemExit(f"synco {argv[0]} {argv[1]} failed with exit code {rc}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--linear-head", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="cpu-demo", help="preset for the efficiency table")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--attacks", default="fgsm,pgd,cw,square,autoattack,tifgsm,onepixel")
    p.add_argument("--efficiency-steps", type=int, default=10)
    p.add_argument("--no-efficiency", action="store_true", help="reuse OUT/efficiency.json instead of measuring")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    from synco.eval.adversarial import adversarial_tables
    from synco.eval.efficiency import efficiency_table
    from synco.eval.robustness import robustness_tables

    out = Path(args.out)
    common = ["--checkpoint", args.checkpoint, "--linear-head", args.linear_head, "--out", str(out), "--no-progress",
              f"dataset={args.dataset}", "num_workers=0", *args.overrides]
    if args.max_images:
        common += ["--max-images", str(args.max_images)]
    seconds = {
        "robustness": _run(["eval", "robustness", *common]),
        "adversarial": _run(["eval", "adversarial", *common, "--attacks", args.attacks]),
    }
    if not args.no_efficiency:
        seconds["efficiency"] = _run(["eval", "efficiency", "--preset", args.preset, "--out", str(out),
                                      "--steps", str(args.efficiency_steps)])
    rob = json.loads((out / "robustness.json").read_text())
    adv = json.loads((out / "adversarial.json").read_text())
    eff = json.loads((out / "efficiency.json").read_text())
    report = "\n\n".join([
        f"# Robustness, adversarial and cost evaluation of `{args.checkpoint}` ({args.dataset})",
        f"## Robustness (Table 13), {seconds['robustness']:.0f} s\n\n{robustness_tables(rob)}",
        f"## Adversarial (Table 14), {seconds['adversarial']:.0f} s\n\n{adversarial_tables(adv)}",
        f"## Efficiency (Table 15), {seconds.get('efficiency', 0):.0f} s\n\n{efficiency_table(eff)}",
    ]) + "\n"
    (out / "acceptance.md").write_text(report)
    print(f"\nwrote {out / 'acceptance.md'}")


if __name__ == "__main__":
    main()
