"""`synco synth-data train|generate|fidelity`: a synthetic clone of a labelled dataset (Syn2Co).

    synco synth-data train --data digits --out runs/digits-diffusion [key=value ...]
    synco synth-data generate --model runs/digits-diffusion --classes all --per-class 144 \\
        --out synthetic/digits [key=value ...]
    synco synth-data fidelity --synthetic synthetic/digits
    synco pretrain --config syn2co-digits        # reads synthetic/digits

    synco synth-data generate --model facebook/DiT-XL-2-256 --classes imagenet100 --per-class 1300 \\
        --out synthetic/imagenet100 steps=50 guidance=4 sampler=ddim format=jpg
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ..errors import SyncoError
from ..options import apply_overrides


def _options_help(cls) -> str:
    defaults = cls()
    def show(v):
        return v if isinstance(v, str) else json.dumps(v)

    return ", ".join(f"{f.name}={show(getattr(defaults, f.name))}" for f in fields(cls))


def register(sub) -> None:
    from ..synth.diffusion import DiffusionTrainConfig
    from ..synth.generate import GenerateConfig

    p = sub.add_parser("synth-data", help="train a small diffusion model / generate a synthetic dataset clone",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Syn2Co: a synthetic clone of a labelled dataset made by a class-conditional "
                                   "diffusion model, for `synco pretrain data.synthetic_root=DIR "
                                   "data.synthetic_ratio=R`.\n\nexamples:\n" + __doc__.split("\n\n", 1)[1])
    ssub = p.add_subparsers(dest="synth_command", metavar="ACTION", required=True)

    t = ssub.add_parser("train", help="train a small class-conditional diffusion model (diffusers UNet2DModel)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train a class-conditional UNet2DModel with a DDPM noise schedule on the "
                                    "built-in digits or an image folder; saved with save_pretrained. A killed run "
                                    "resumes when re-run with the same --out.\n\noptions (key=value): "
                                    + _options_help(DiffusionTrainConfig))
    t.add_argument("--data", required=True, help="'digits' or an image folder (root/<class>/<img> or root/train/...)")
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps=3000 lr=1e-3 image_size=32")
    t.set_defaults(func=run_train)

    g = ssub.add_parser("generate", help="write an ImageFolder clone + manifest (resumable)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Generate --per-class images for each class into OUT/<class>/ with a "
                                    "manifest. Re-running skips images already written.\n\noptions (key=value): "
                                    + _options_help(GenerateConfig))
    g.add_argument("--model", required=True,
                   help="a `synth-data train` directory, a diffusers pipeline directory, or a hub id already in "
                        "the Hugging Face cache (e.g. facebook/DiT-XL-2-256); nothing is downloaded")
    g.add_argument("--classes", default="all",
                   help="'all' (the model's classes), a shipped list (imagenet100), a file with one class per "
                        "line, or a comma-separated list (default: all)")
    g.add_argument("--per-class", type=int, required=True, help="images per class")
    g.add_argument("--out", required=True, help="output ImageFolder root")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps=25 guidance=2 sampler=ddim")
    g.set_defaults(func=run_generate)

    f = ssub.add_parser("fidelity", help="classify synthetic images with a classifier trained on real ones",
                        description="Train a pixel classifier on real train images (default: the built-in "
                                    "digits), report its per-class accuracy on the synthetic folder and on the "
                                    "real test split (JSON + Markdown).")
    f.add_argument("--synthetic", required=True, help="the generated ImageFolder root")
    f.add_argument("--real", default="digits", help="'digits' (default) or a folder dataset root with train/ and val/")
    f.add_argument("--out", default=None, help="report directory (default: the synthetic folder)")
    f.add_argument("--classifier", default="svm", choices=("svm", "logreg"))
    f.add_argument("--size", type=int, default=0, help="compare at SIZExSIZE pixels (default: the synthetic size)")
    f.set_defaults(func=run_fidelity)


def run_train(args) -> int:
    from ..synth.diffusion import DiffusionTrainConfig, train_diffusion, validate_train_config

    cfg = apply_overrides(DiffusionTrainConfig(), args.overrides or [])
    validate_train_config(cfg)
    summary = train_diffusion(args.data, Path(args.out), cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def run_generate(args) -> int:
    from ..synth.generate import GenerateConfig, generate, validate_generate_config

    cfg = apply_overrides(GenerateConfig(), args.overrides or [])
    validate_generate_config(cfg)
    figures = generate(args.model, args.classes, args.per_class, Path(args.out), cfg, progress=not args.no_progress)
    print(json.dumps(figures, indent=2))
    return 0


def run_fidelity(args) -> int:
    from ..io import claimed_output_dir
    from ..synth.fidelity import fidelity, to_markdown, write_report

    if not Path(args.synthetic).is_dir():
        raise SyncoError(f"synthetic folder '{args.synthetic}' does not exist; make one with "
                         "`synco synth-data generate`.")
    # --out is checked before the classifier is trained (an unwritable one would fail only after it), and locked:
    # by default it is the synthetic folder, which a generate still filling it holds.
    with claimed_output_dir(args.out or args.synthetic, "synth-data fidelity") as out:
        result = fidelity(args.synthetic, real=args.real, size=args.size, classifier=args.classifier)
        write_report(result, out)
    print(to_markdown(result))
    return 0
