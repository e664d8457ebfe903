"""The robustness benchmarks of Table 13: one spec per column says where its images come from and how
the evaluator scores it.

The table's order is the specs' order: the result keys, the Table 13 row, the Markdown tables and the
order the evaluator runs them all follow :data:`BENCHMARKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .classes import class_dirs


@dataclass(frozen=True)
class BenchmarkSpec:
    key: str  # the result key in robustness.json
    column: str  # the Table 13 column
    group: str  # the name the `benchmarks` option selects it by
    kind: str  # how it is evaluated: clean | folder | v2 | corruption | watermark | ood
    option: Optional[str] = None  # the option naming its folder (None: the clean set's dataset/root)
    masked: bool = False  # a 200-class set: argmax over the classes present only
    uses_clean: bool = False  # made from, or compared with, the clean set, which must then run first
    folder_names: tuple[str, ...] = ()  # v2: the variant's folder, less 'imagenetv2-' and '-format-val'

    @property
    def metric(self) -> str:
        return "fpr95" if self.kind == "ood" else "top1"


BENCHMARKS: tuple[BenchmarkSpec, ...] = (
    BenchmarkSpec("clean", "IN", "clean", "clean", uses_clean=True),
    BenchmarkSpec("imagenet_v2_mf", "MF", "v2", "v2", "imagenet_v2_root",
                  folder_names=("matched-frequency", "matched_frequency", "matchedfrequency", "mf")),
    BenchmarkSpec("imagenet_v2_t07", "T-0.7", "v2", "v2", "imagenet_v2_root",
                  folder_names=("threshold0.7", "threshold-0.7", "threshold_0.7", "t0.7", "t-0.7")),
    BenchmarkSpec("imagenet_v2_ti", "TI", "v2", "v2", "imagenet_v2_root",
                  folder_names=("top-images", "top_images", "topimages", "ti")),
    BenchmarkSpec("imagenet_c", "IN-C", "c", "corruption", "imagenet_c_root", uses_clean=True),
    BenchmarkSpec("imagenet_a", "IN-A", "a", "folder", "imagenet_a_root", masked=True),
    BenchmarkSpec("imagenet_w", "IN-W", "w", "watermark", "imagenet_w_root", uses_clean=True),
    BenchmarkSpec("imagenet_sketch", "IN-S", "sketch", "folder", "imagenet_sketch_root"),
    BenchmarkSpec("imagenet_r", "IN-R", "r", "folder", "imagenet_r_root", masked=True),
    BenchmarkSpec("imagenet_o", "IN-O", "o", "ood", "imagenet_o_root", uses_clean=True),
)
BY_KEY = {s.key: s for s in BENCHMARKS}
GROUPS = tuple(dict.fromkeys(s.group for s in BENCHMARKS))  # what the `benchmarks` option picks among


def specs_to_run(groups: Iterable[str]) -> list[BenchmarkSpec]:
    """The benchmarks of the asked groups in table order, led by the clean set whenever one of them uses it."""
    asked = set(groups)
    chosen = [s for s in BENCHMARKS if s.group in asked]
    if any(s.uses_clean for s in chosen) and BENCHMARKS[0] not in chosen:
        chosen.insert(0, BENCHMARKS[0])
    return chosen


def find_v2_variants(root: Path) -> dict[str, Path]:
    """Table 13 column -> folder, from a folder holding the ImageNet-v2 variants (or being one of them)."""
    def variant(name: str) -> Optional[str]:
        n = name.lower()
        n = n[len("imagenetv2-"):] if n.startswith("imagenetv2-") else n
        n = n[: -len("-format-val")] if n.endswith("-format-val") else n
        return next((s.column for s in BENCHMARKS if n in s.folder_names), None)

    own = variant(root.name)
    if own is not None:
        return {own: root}
    out = {}
    for d in class_dirs(root):
        column = variant(d)
        if column is not None and column not in out:
            out[column] = root / d
    return out
