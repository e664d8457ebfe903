"""`synco eval knn`"""

from __future__ import annotations

from .evaluate import common_arguments, run_protocol


def register_protocols(psub) -> None:
    p = psub.add_parser("knn", help="weighted k-NN (cosine, T=0.07, k in 10/20/100/200), top-1/top-5")
    common_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.knn_protocol import KnnOptions, run_knn

    return run_protocol(args, KnnOptions, run_knn)
