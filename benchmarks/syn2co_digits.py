"""Syn2Co on the built-in digits, end to end (issue 5 acceptance numbers).

    python benchmarks/syn2co_digits.py --out runs/syn2co-digits --epochs 25

1. trains the small class-conditional diffusion model on the real digits train split (timed);
2. generates a synthetic clone, ``--per-class`` images per class (throughput in images/s);
3. fidelity: an SVM trained on real train digits classifies the synthetic ones (per-class accuracy);
4. pretrains synco backbones with the cpu-demo preset (``epochs`` shortened to ``--epochs``) at
   data.synthetic_ratio 0, 0.5 and 1 (replace mode: every epoch has as many images as the real set)
   and reads their k-NN top-1 on the REAL test digits from each run's summary.json.

Every stage is skipped when its output is already complete, so a killed run continues where it stopped
(pretraining resumes from its checkpoint). Prints Markdown tables and writes OUT/results.{json,md}.
Equivalent CLI commands are printed as each stage starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import synco  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synco.cli.main import main as synco_main  # noqa: E402
from synco.config import apply_overrides  # noqa: E402
from synco.io import atomic_write_text  # noqa: E402
from synco.synth.diffusion import MODEL_FILE, DiffusionTrainConfig, train_diffusion  # noqa: E402
from synco.synth.fidelity import fidelity, to_markdown, write_report  # noqa: E402
from synco.synth.generate import GenerateConfig, generate  # noqa: E402
from synco.synth.output_folder import SETTINGS  # noqa: E402


def say(msg: str) -> None:
    print(f"\n== {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/syn2co-digits")
    p.add_argument("--epochs", type=int, default=15, help="pretraining epochs per ratio (the cpu-demo preset has 25)")
    p.add_argument("--ratios", default="0,0.5,1")
    p.add_argument("--per-class", type=int, default=144, help="synthetic images per class (real: ~144)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for every stage")
    p.add_argument("--train", nargs="*", default=[], metavar="key=value", help="synth-data train options")
    p.add_argument("--generate", nargs="*", default=[], metavar="key=value", help="synth-data generate options")
    p.add_argument("--pretrain", nargs="*", default=[], metavar="key=value", help="extra pretrain overrides")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, syn_dir = out / "diffusion", out / "synthetic"
    results: dict = {"epochs": args.epochs, "per_class": args.per_class, "threads": args.threads}
    progress = not args.no_progress

    # 1. diffusion model
    train_opts = [f"threads={args.threads}", *args.train]
    say(f"synco synth-data train --data digits --out {model_dir} {' '.join(train_opts)}")
    if not (model_dir / MODEL_FILE).exists():
        train_diffusion("digits", model_dir, apply_overrides(DiffusionTrainConfig(), train_opts), progress=progress)
    meta = json.loads((model_dir / MODEL_FILE).read_text())
    results["diffusion"] = {k: meta.get(k) for k in ("train_steps", "train_seconds", "train_cpu_seconds_last_run",
                                                     "final_loss", "parameters", "image_size", "sampler",
                                                     "sample_steps", "guidance")}

    # 2. synthetic clone
    gen_opts = [f"threads={args.threads}", *args.generate]
    say(f"synco synth-data generate --model {model_dir} --classes all --per-class {args.per_class} "
        f"--out {syn_dir} {' '.join(gen_opts)}")
    figures = generate(str(model_dir), "all", args.per_class, syn_dir, apply_overrides(GenerateConfig(), gen_opts),
                       progress=progress)
    gen_log = out / "generation_runs.jsonl"
    if figures["generated"]:
        with open(gen_log, "a") as f:
            f.write(json.dumps(figures) + "\n")
    runs = [json.loads(line) for line in gen_log.read_text().splitlines()] if gen_log.exists() else []
    n, s = sum(r["generated"] for r in runs), sum(r["seconds"] for r in runs)
    settings = json.loads((syn_dir / SETTINGS).read_text())
    results["generation"] = {"images": figures["total"], "generated_seconds": round(s, 2),
                             "images_per_second": round(n / s, 2) if s else None,
                             **{k: settings[k] for k in ("sampler", "steps", "guidance", "resolution")}}

    # 3. fidelity
    say(f"synco synth-data fidelity --synthetic {syn_dir}")
    fid = fidelity(syn_dir)
    write_report(fid, syn_dir)
    results["fidelity"] = fid

    # 4. pretraining at each ratio
    results["pretrain"] = {}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        run = out / f"pretrain-ratio{ratio:g}"
        cmd = ["pretrain", "--config", "cpu-demo", "--out", str(run), f"epochs={args.epochs}",
               f"threads={args.threads}", f"data.synthetic_root={syn_dir}", f"data.synthetic_ratio={ratio}",
               *args.pretrain]
        if not progress:
            cmd.insert(1, "--no-progress")
        say("synco " + " ".join(cmd))
        if not (run / "summary.json").exists():
            t0 = time.perf_counter()
            rc = synco_main(cmd)
            if rc:
                return rc
            print(f"ratio {ratio:g}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        summary = json.loads((run / "summary.json").read_text())
        ends = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in ends if r.get("epoch_end")][-1]
        results["pretrain"][f"{ratio:g}"] = {
            "knn_top1": summary.get("knn_top1"), "knn_top1_random_init": summary.get("knn_top1_random_init"),
            "knn_top1_pixels": summary.get("knn_top1_pixels"), "train_seconds": summary.get("train_seconds"),
            "real_images_per_epoch": last["real_images"], "synthetic_images_per_epoch": last["synthetic_images"]}

    md = report(results)
    atomic_write_text(json.dumps(results, indent=2) + "\n", out / "results.json")
    atomic_write_text(md, out / "results.md")
    print(md)
    return 0


def _pct(v) -> str:  # summary.json k-NN figures are already percentages
    return "-" if v is None else f"{v:.2f}"


def report(r: dict) -> str:
    d, g = r["diffusion"], r["generation"]
    lines = ["## Syn2Co on digits", "",
             f"Diffusion model: {d['parameters'] / 1e6:.2f}M-parameter UNet2DModel at {d['image_size']}x"
             f"{d['image_size']}, {d['train_steps']} steps in {d['train_seconds']:.0f} s"
             + (f" ({d['train_cpu_seconds_last_run']:.0f} CPU-seconds)" if d.get("train_cpu_seconds_last_run") else "")
             + f", final loss {d['final_loss']:.4f}.",
             f"Generation: {g['images']} images ({g['sampler']}, {g['steps']} steps, guidance {g['guidance']}, "
             f"saved at {g['resolution']}x{g['resolution']}), {g['images_per_second']} images/s.",
             f"Threads: {r['threads']}.", "", to_markdown(r["fidelity"]),
             f"### k-NN top-1 on the real test digits (cpu-demo, {r['epochs']} epochs)", "",
             "| synthetic ratio | real / synthetic images per epoch | k-NN top-1 (%) | random init (%) | "
             "pixels (%) | train time (s) |", "|---:|---:|---:|---:|---:|---:|"]
    for ratio, p in r["pretrain"].items():
        lines.append(f"| {ratio} | {p['real_images_per_epoch']} / {p['synthetic_images_per_epoch']} | "
                     f"{_pct(p['knn_top1'])} | {_pct(p['knn_top1_random_init'])} | {_pct(p['knn_top1_pixels'])} | "
                     f"{p['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
