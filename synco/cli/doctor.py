"""`synco doctor [--config PRESET] [--bench] [--json FILE] [key=value ...]`

The environment a run of PRESET would get on this machine: torch / CUDA / driver versions, the GPUs (memory,
compute capability, bf16, datasheet peak), NCCL, which attention kernel the preset's backbone runs, free
/dev/shm, CPU cores per GPU, and whether the preset would run here at all. It exits 0 whatever it finds.

--bench also times a short training at the preset's shapes on random inputs, through the trainer's own step:
images/s, step time (median), peak memory, FLOPs per step and MFU against the GPU's datasheet peak. A GPU
preset on a machine without a usable GPU is measured on the CPU at a small batch, and the output says so.
"""

from __future__ import annotations

import argparse
import sys

from ..config import preset_names


def register(sub) -> None:
    p = sub.add_parser("doctor", help="the environment a run would get (GPUs, driver, NCCL, attention, /dev/shm, "
                                      "cores); --bench times a short training",
                       description=__doc__.split("\n", 2)[2] + f"\nPresets: {', '.join(preset_names())}.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cpu-demo", help="preset name or YAML file (default: cpu-demo)")
    p.add_argument("--bench", action="store_true", help="time a short training at the preset's shapes")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report to FILE as JSON")
    p.add_argument("--steps", type=int, default=None,
                   help="--bench: timed steps (default 10; 2 for a GPU preset on the CPU)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="--bench: untimed steps first (default 3; 1 for a GPU preset on the CPU; >= 2 with compile)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="--bench: batch per process (default: the preset's; 8 for a GPU preset on the CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. precision=fp32")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.doctor import run_doctor

    run_doctor(args.config, args.overrides, bench_run=args.bench, json_path=args.json, steps=args.steps,
               warmup_steps=args.warmup_steps, batch_size=args.batch_size)
    if args.json:
        print(f"synco: report written to {args.json}", file=sys.stderr)
    return 0
