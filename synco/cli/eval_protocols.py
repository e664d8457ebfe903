"""`synco eval linear | finetune | transfer`"""

from __future__ import annotations

from .evaluate import common_arguments, finish, options_from, run_protocol


def register_protocols(psub) -> None:
    p = psub.add_parser(
        "linear", help="linear probe on frozen features, LR grid {0.1..1.5} in one pass, best head by held-out split",
        description="Linear probing (SynCo-v2 7.5): SGD m=0.9, 100 epochs (5 warm-up, cosine), wd 0, label "
                    "smoothing 0.1, RandomResizedCrop+flip; every lr of `lrs` trained in one pass; writes "
                    "linear.json and linear_head.pt. Options (key=value): epochs, warmup_epochs, lrs=[..], "
                    "lr_batch_ref, nesterov, bn, val_fraction, cache_features, label_smoothing, dataset, root, "
                    "batch_size, device, seed, ... Resumes from <out>/linear_ckpt.pt.")
    common_arguments(p)
    p.set_defaults(func=run_linear)

    p = psub.add_parser(
        "finetune", help="fine-tune all weights (SGD lr 1e-3, wd 1e-4, 100 epochs, dropout 0.1, clip 1.0)",
        description="Fine-tuning (SynCo-v2 7.6): SGD m=0.9, lr 1e-3, wd 1e-4, cosine with 10 warm-up epochs, "
                    "100 epochs, RandomResizedCrop+flip, dropout 0.1, label smoothing 0.1, gradient clipping 1.0; "
                    "writes finetune.json. Options: epochs, warmup_epochs, lr, weight_decay, dropout, clip_grad, "
                    "dataset, root, batch_size, ... Resumes from <out>/finetune_ckpt.pt.")
    common_arguments(p)
    p.set_defaults(func=run_finetune)

    from ..eval.transfer import SPECS

    where = "; ".join(f"{s.name}: ROOT/{s.location} (torchvision {s.tv_class})" for s in SPECS.values())
    p = psub.add_parser(
        "transfer", help="linear (lr 1.0) and/or fine-tuning on the 11 datasets of Table 9 (torchvision, no download)",
        description="Transfer to the downstream datasets of Table 9, read from root=ROOT by torchvision with "
                    f"download off. Expected locations: {where}. Hyper-parameters: linear.epochs=..., "
                    "finetune.epochs=..., etc. Writes transfer.json (and transfer/<dataset>/).")
    common_arguments(p)
    p.add_argument("--datasets", default=None, help=f"comma-separated subset of: {','.join(SPECS)} (default: all)")
    p.add_argument("--modes", default=None, help="linear, finetune or linear,finetune (default: linear)")
    p.set_defaults(func=run_transfer)


def run_linear(args) -> int:
    from ..eval.linear import LinearOptions, run_linear as run

    return run_protocol(args, LinearOptions, run)


def run_finetune(args) -> int:
    from ..eval.finetune import FinetuneOptions, run_finetune as run

    return run_protocol(args, FinetuneOptions, run)


def run_transfer(args) -> int:
    from ..eval.transfer import MODES, SPECS, TransferOptions, parse_names, run_transfer as run

    opts, out = options_from(args, TransferOptions)
    if args.datasets:
        opts.datasets = parse_names(args.datasets, list(SPECS), "transfer dataset(s)")
    if args.modes:
        opts.modes = parse_names(args.modes, list(MODES), "transfer mode(s)")
    run(args.checkpoint, out, opts, progress=not args.no_progress)
    finish()
    return 0
