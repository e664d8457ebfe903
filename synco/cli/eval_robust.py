"""`synco eval robustness | adversarial | efficiency` (Tables 13, 14 and 15)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SyncoError
from .evaluate import common_arguments, finish, options_from


def _head_protocol_arguments(p, max_images_help: str) -> None:
    """The flags of the protocols that test a frozen backbone with its linear head."""
    common_arguments(p)
    p.add_argument("--linear-head", required=True, help="linear_head.pt from `synco eval linear` (or its dir)")
    p.add_argument("--max-images", type=int, default=None, help=max_images_help)


def register_protocols(psub) -> None:
    p = psub.add_parser(
        "robustness", help="ImageNet-v2/-C/-A/-W/-Sketch/-R top-1 and ImageNet-O FPR95 with a frozen linear head",
        description="Benchmarks come from folders (imagenet_v2_root=, imagenet_c_root=, imagenet_a_root=, "
                    "imagenet_w_root=, imagenet_sketch_root=, imagenet_r_root=, imagenet_o_root=); the clean set "
                    "from dataset=/root=. Without imagenet_c_root / imagenet_w_root the corruptions and the "
                    "watermark are generated from the clean set. Benchmarks whose folder is not given are skipped "
                    "(unless benchmarks= names them: then, as for a folder that does not exist, it is an "
                    "error). Other options: "
                    "corruptions=[...], severities=[1,...,5], benchmarks=[clean,v2,c,a,w,sketch,r,o], "
                    "corruption_on_the_fly, watermark_on_the_fly, max_images, crop_ratio, batch_size, "
                    "num_workers, device. Writes robustness.json.")
    _head_protocol_arguments(p, "at most this many images per evaluated set")
    p.set_defaults(func=run_robustness)

    p = psub.add_parser("adversarial", help="FGSM/PGD/C&W/Square/AutoAttack/TIFGSM/OnePixel top-1 (torchattacks)",
                        description="Untargeted attacks with the SynCo-v2 settings (section 8.3) on [0, 1] images, "
                                    "normalisation inside the attacked model, on the clean validation set "
                                    "(dataset=, root=). Writes adversarial.json.")
    _head_protocol_arguments(p, "attack a fixed random subset of this many images")
    p.add_argument("--attacks", default=None,
                   help="comma-separated subset of fgsm,pgd,cw,square,autoattack,tifgsm,onepixel (default: all)")
    p.set_defaults(func=run_adversarial)

    p = psub.add_parser("efficiency", help="params, memory and time per epoch of synco/moby/byol (Table 15)",
                        description="key=value sets efficiency options (preset, methods, batch_size, steps, "
                                    "warmup_steps, epoch_images, device, threads) or, for any other key, the "
                                    "pretraining config of the preset (e.g. model.backbone=...).")
    p.add_argument("--preset", default=None, help="preset name or YAML (default: cpu-demo)")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch (default: the preset's)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: byol,moby,synco)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per method (default: 10)")
    p.add_argument("--out", default=None, help="output dir (default: runs/efficiency)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run_efficiency, protocol="efficiency")


def _given(overrides, name: str) -> bool:
    return any(o.split("=", 1)[0].strip() == name for o in overrides or [])


def take_flag(opts, overrides, name: str, flag: str, value, same=None) -> None:
    """``opts.<name> = value`` for a flag that was given (``value`` not None). The same option given as key=value
    too, with another value, is an error: either choice would be a guess, silently measuring something else.
    ``same(a, b)`` compares the two (default ``==``)."""
    if value is None:
        return
    current = getattr(opts, name)
    if _given(overrides, name) and not (same or (lambda a, b: a == b))(current, value):
        raise SyncoError(f"{flag} {value!r} and {name}={current!r} give the option '{name}' two values. Give it "
                         "once, as the flag or as key=value.")
    setattr(opts, name, value)


def _with_max_images(args, options_cls):
    """--max-images as the max_images= override (after checking that one given as key=value agrees)."""
    if getattr(args, "max_images", None) is not None:
        from ..options import apply_overrides

        own = [o for o in args.overrides or [] if o.split("=", 1)[0].strip() == "max_images"]
        take_flag(apply_overrides(options_cls(), own), own, "max_images", "--max-images", args.max_images)
        if not own:
            args.overrides = list(args.overrides or []) + [f"max_images={args.max_images}"]
    return args


def run_robustness(args) -> int:
    from ..eval.robustness import RobustnessOptions, run_robustness as run

    opts, out = options_from(_with_max_images(args, RobustnessOptions), RobustnessOptions)
    run(args.checkpoint, args.linear_head, out, opts, progress=not args.no_progress)
    finish()
    return 0


def run_adversarial(args) -> int:
    from ..eval.adversarial import AdversarialOptions, parse_attacks, run_adversarial as run

    opts, out = options_from(_with_max_images(args, AdversarialOptions), AdversarialOptions)
    attacks = None if args.attacks is None else parse_attacks(args.attacks)
    take_flag(opts, args.overrides, "attacks", "--attacks", attacks, same=lambda a, b: parse_attacks(a) == b)
    run(args.checkpoint, args.linear_head, out, opts, progress=not args.no_progress)
    finish()
    return 0


def run_efficiency(args) -> int:
    from dataclasses import fields

    from ..eval.efficiency import EfficiencyOptions, run_efficiency as run
    from ..options import apply_overrides, check_options

    names = {f.name for f in fields(EfficiencyOptions)}
    own = [o for o in args.overrides or [] if o.split("=", 1)[0].strip() in names]
    config_overrides = [o for o in args.overrides or [] if o not in own]
    opts = apply_overrides(EfficiencyOptions(), own)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, flag, value in (("preset", "--preset", args.preset), ("batch_size", "--batch-size", args.batch_size),
                              ("steps", "--steps", args.steps), ("methods", "--methods", methods)):
        take_flag(opts, own, name, flag, value)
    check_options(opts)  # the flags too (--steps 0)
    run(Path(args.out) if args.out else Path("runs") / "efficiency", opts, config_overrides)
    return 0
