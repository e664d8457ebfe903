"""`synco eval robustness`: distribution-shift and OOD benchmarks for backbone + frozen linear head (Table 13).

The linear head trained on clean data (``synco eval linear`` -> ``linear_head.pt``) is evaluated, without any
further training, on:

* the clean validation set (the "IN" column), from ``dataset``/``root`` as in every protocol;
* ImageNet-v2 (matched-frequency, threshold-0.7, top-images), ImageNet-Sketch, ImageNet-W, ImageNet-A and
  ImageNet-R: top-1 from user folders of class folders. Folders are matched to the head's classes **by name**
  (wnid), never by position; ImageNet-v2's integer folder names ``0..999`` are read as class indices. For
  ImageNet-A and ImageNet-R (200 classes) the logits are restricted to the classes present;
* ImageNet-C: mean top-1 over corruptions x severities from ``root/<corruption>/<severity>/<wnid>/``, or, when
  that folder is not given, generated on the fly from the clean set with ``corrupt-tta`` (any dataset, digits
  included), reported per corruption, per family (noise / blur / weather / digital) and per severity;
* ImageNet-W: from its folder, or generated on the fly with the ``imagenet-w`` watermark;
* ImageNet-O: FPR at 95% TPR with the maximum softmax probability, the clean set as in-distribution.

Every image gets the same centre-crop preprocessing (resize the short side to size / crop_ratio, centre-crop);
corruptions and the watermark are applied to the cropped uint8 image, as ImageNet-C/-W were made. With the
default ``benchmarks`` (all), a benchmark whose folder is not given is skipped with a message; the others still
run. A folder given that does not exist, or a benchmark named in ``benchmarks=`` without its data, is an error
before any work (:func:`check_benchmark_data`); one named there that cannot be evaluated (e.g. a clean set without
the head's classes) is an error too, before robustness.json is written.

This module holds the options and the evaluator; the benchmarks are specified in :mod:`.benchmarks`, made
in :mod:`.views`, :mod:`.classes` and :mod:`.corruptions`, and printed by :mod:`.robustness_tables`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.folder import EvalImageError, SafeImageFolder
from ..device import resolve_device
from ..engine import dist
from ..errors import SyncoError
from ..options import check_options, opt
from .benchmarks import BENCHMARKS, BY_KEY, GROUPS, BenchmarkSpec, find_v2_variants, specs_to_run
from .classes import head_labels, masked_argmax, open_class_folder, preview, resolve_class_root
from .common import CROP_RATIO, DEFAULT_CROP_RATIO, EvalOptions, create_eval_set, eval_split_and_crop
from .corruptions import IMAGENET_C, SEVERITIES, Corruption, Watermark, check_corruptions, summarize_corruptions
from .head import load_classifier
from .ood import max_softmax_probability, ood_metrics
from .results import save_result
from .robustness_tables import robustness_tables, table13_row
from .views import BenchmarkView, center_crop_ops, subset_indices


@dataclass
class RobustnessOptions(EvalOptions):
    imagenet_v2_root: Optional[str] = None  # holds the three variant folders (or is one of them)
    imagenet_sketch_root: Optional[str] = None
    imagenet_w_root: Optional[str] = None
    imagenet_c_root: Optional[str] = None  # <corruption>/<severity>/<wnid>/<image>
    imagenet_a_root: Optional[str] = None
    imagenet_r_root: Optional[str] = None
    imagenet_o_root: Optional[str] = None
    corruptions: list[str] = opt(factory=lambda: list(IMAGENET_C), nonempty=True)  # names: check_corruptions
    severities: list[int] = opt(factory=lambda: list(SEVERITIES), nonempty=True, ge=1, le=5)
    corruption_on_the_fly: bool = True  # no imagenet_c_root: corrupt the clean set with corrupt-tta
    watermark_on_the_fly: bool = True  # no imagenet_w_root: watermark the clean set with imagenet-w
    # an empty list would evaluate nothing and still overwrite robustness.json
    benchmarks: list[str] = opt(factory=lambda: list(GROUPS), nonempty=True, choices=tuple(GROUPS))
    # per evaluated set: a fixed random subset (seed) of at most this many
    max_images: Optional[int] = opt(None, ge=1, why="or null for all")
    crop_ratio: Optional[float] = opt(None, **CROP_RATIO)  # default 224/256 (1.0 for the clean digits set)


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                    allowed: Optional[torch.Tensor] = None, want_scores: bool = False,
                    desc: str = "eval", progress: bool = True) -> dict:
    """Top-1 (%) of ``model`` over the loader; with ``allowed``, argmax over those classes only.
    With ``want_scores`` also the MSP scores (over all classes) of every sample, in order."""
    model.eval()
    correct, n, scores = 0, 0, []
    use_bf16 = device.type == "cuda"
    for x, y in tqdm(loader, desc=desc, disable=not progress or not dist.is_main(), leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x.to(device, non_blocking=True))
        logits = logits.float()
        pred = masked_argmax(logits, allowed) if allowed is not None else logits.argmax(dim=1)
        y = torch.as_tensor(y).to(device)
        correct += int((pred == y).sum())
        n += int(y.numel())
        if want_scores:
            scores.append(max_softmax_probability(logits).cpu())
    out = {"top1": 100.0 * correct / max(n, 1), "n": n}
    if want_scores:
        out["scores"] = torch.cat(scores) if scores else torch.zeros(0)
    return out


class RobustnessEvaluator:
    """Runs the benchmarks the options name on one classifier; ``run()`` returns the result dict."""

    def __init__(self, model: torch.nn.Module, head_classes: Sequence[str], opts: RobustnessOptions,
                 size: int, device: torch.device, progress: bool = True, log: Callable[[str], None] = print):
        self.model, self.classes, self.opts = model, [str(c) for c in head_classes], opts
        self.size, self.device, self.progress, self.log = int(size), device, progress, log
        self.results: dict = {}
        self.skipped: dict[str, str] = {}
        self._clean = None  # (base dataset, indices, labels, crop)
        self._clean_scores: Optional[torch.Tensor] = None
        check_options(opts)
        check_corruptions(opts.corruptions, opts.severities)
        check_benchmark_data(opts)
        self._evaluate = {"clean": self.clean, "folder": self.folder, "v2": self.imagenet_v2,
                          "corruption": self.imagenet_c, "watermark": self.imagenet_w, "ood": self.imagenet_o}

    def run(self) -> dict:
        chosen = specs_to_run(self.opts.benchmarks)
        for i, spec in enumerate(chosen):
            self._evaluate[spec.kind](spec)
            if i + 1 == len(chosen) or chosen[i + 1].group != spec.group:  # the group's last benchmark
                self._check_asked_group_ran(spec.group)
        if "clean" not in self.opts.benchmarks:  # run only as the source of other benchmarks
            self.results.pop("clean", None)
        return {"results": self.results, "skipped": self.skipped, "table13": table13_row(self.results)}

    def _check_asked_group_ran(self, group: str) -> None:
        """A group named in ``benchmarks=`` (a choice, not the default of all) that gave no number at all is an
        error, at once and before robustness.json is written: exit 0 with an empty result would overwrite an
        earlier one and pass for a measurement. (ImageNet-v2 counts when one of its variants ran.)"""
        if group not in self.opts.benchmarks or sorted(set(self.opts.benchmarks)) == sorted(GROUPS):
            return
        specs = [s for s in BENCHMARKS if s.group == group]
        if any(s.key in self.results for s in specs):
            return
        why = "; ".join(f"{s.column}: {self.skipped.get(s.key, 'not run')}" for s in specs)
        raise SyncoError(f"benchmarks={list(self.opts.benchmarks)} asks for {group}, which could not be evaluated "
                         f"({why}). Fix its data, or drop {group} from benchmarks=; robustness.json was not written "
                         "(an earlier one is kept).")

    # -- helpers ----------------------------------------------------------------------------------

    def _crop(self, crop_ratio: Optional[float] = None) -> list:
        return center_crop_ops(self.size, self.opts.crop_ratio or crop_ratio or DEFAULT_CROP_RATIO)

    def _loader(self, view: Dataset) -> DataLoader:
        return DataLoader(view, batch_size=self.opts.batch_size, shuffle=False, num_workers=self.opts.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _eval(self, view: Dataset, desc: str, allowed=None, want_scores=False) -> dict:
        return evaluate_loader(self.model, self._loader(view), self.device, allowed=allowed,
                               want_scores=want_scores, desc=desc, progress=self.progress)

    def _skip(self, spec: BenchmarkSpec, reason: str) -> None:
        self.skipped[spec.key] = reason
        self.log(f"skipped {spec.column} ({spec.key}): {reason}")

    def _root(self, spec: BenchmarkSpec) -> Optional[Path]:
        value = getattr(self.opts, spec.option)
        if value is None:
            self._skip(spec, f"not given (set {spec.option}=DIR)")
            return None
        path = Path(value).expanduser()
        if not path.is_dir():
            self._skip(spec, f"{spec.option}='{value}' does not exist or is not a directory")
            return None
        return path

    def _guard(self, spec: BenchmarkSpec, fn: Callable[[], Optional[dict]]) -> None:
        """Run one benchmark; a user error (a folder without the head's classes, ...) skips it, not the rest. An
        unreadable image stops the command as in every evaluation (a benchmark skipped for it would hide it)."""
        try:
            res = fn()
        except EvalImageError:
            raise
        except SyncoError as e:
            self._skip(spec, str(e))
            return
        if res is not None:
            self.results[spec.key] = res
            if "top1" in res:
                self.log(f"{spec.column}: top-1 {res['top1']:.2f}% on {res['n']} images")

    def _folder_top1(self, spec: BenchmarkSpec, root: Path) -> dict:
        ds, labels, class_root = open_class_folder(root, self.classes, spec.column)
        idx = subset_indices(len(ds), self.opts.max_images, self.opts.seed)
        allowed = torch.as_tensor(sorted(set(labels)), dtype=torch.long) if spec.masked else None
        res = self._eval(BenchmarkView(ds, idx, self._crop(), labels=labels), spec.column, allowed=allowed)
        res.update({"root": str(class_root), "classes": len(set(labels)), "masked": spec.masked})
        return res

    # -- one method per kind of benchmark ---------------------------------------------------------

    def clean(self, spec: BenchmarkSpec = BY_KEY["clean"]):
        o = self.opts
        if o.dataset in (None, "none"):
            self._skip(spec, "no clean validation set (dataset=none)")
            return
        try:
            base = create_eval_set(o, self.size)
        except SyncoError as e:
            self._skip(spec, str(e))
            return
        labels, missing = head_labels(list(base.classes), self.classes)
        if missing:
            self._skip(spec, f"the clean set's classes {preview(missing)} are not classes of the linear head "
                             f"({preview(self.classes)}): was the head trained on another dataset?")
            return
        idx = subset_indices(len(base), o.max_images, o.seed)
        crop = self._crop(eval_split_and_crop(o.dataset)[1])
        self._clean = (base, idx, labels, crop)
        want = any(s.group in o.benchmarks for s in BENCHMARKS if s.kind == "ood")  # its in-distribution scores
        res = self._eval(BenchmarkView(base, idx, crop, labels=labels), "clean", want_scores=want)
        self._clean_scores = res.pop("scores", None)
        res["dataset"] = o.dataset
        self.results[spec.key] = res
        self.log(f"{spec.column} (clean {o.dataset}): top-1 {res['top1']:.2f}% on {res['n']} images")

    def folder(self, spec: BenchmarkSpec):
        root = self._root(spec)
        if root is not None:
            self._guard(spec, lambda: self._folder_top1(spec, root))

    def imagenet_v2(self, spec: BenchmarkSpec):
        root = self._root(spec)
        if root is None:
            return
        found = find_v2_variants(root).get(spec.column)
        if found is None:
            self._skip(spec, f"no {spec.column} folder in '{getattr(self.opts, spec.option)}' (expected one of "
                             f"imagenetv2-{spec.folder_names[0]}-format-val, ...)")
            return
        self._guard(spec, lambda: self._folder_top1(spec, found))

    def imagenet_c(self, spec: BenchmarkSpec):
        o = self.opts
        if o.imagenet_c_root is not None:
            root = self._root(spec)
            if root is not None:
                self._guard(spec, lambda: self._imagenet_c_folder(spec, root))
            return
        if not o.corruption_on_the_fly:
            self._skip(spec, "not given (set imagenet_c_root=DIR, or corruption_on_the_fly=true)")
        elif self._clean is None:
            self._skip(spec, "not given, and no clean set to corrupt on the fly")
        elif not o.corruptions:
            self._skip(spec, "corruptions=[] selects none")
        else:
            self._guard(spec, self._imagenet_c_generated)

    def _imagenet_c_generated(self) -> dict:
        base, idx, labels, crop = self._clean
        acc: dict[str, dict[int, float]] = {}
        n = 0
        for name in self.opts.corruptions:
            for s in self.opts.severities:
                view = BenchmarkView(base, idx, crop, effect=Corruption(name, s, self.opts.seed), labels=labels)
                r = self._eval(view, f"{name}/{s}")
                acc.setdefault(name, {})[int(s)] = r["top1"]
                n = r["n"]
        return summarize_corruptions(acc, source="generated (corrupt-tta) from the clean set", n=n)

    def _imagenet_c_folder(self, spec: BenchmarkSpec, root: Path) -> dict:
        acc: dict[str, dict[int, float]] = {}
        missing, n = [], 0
        for name in self.opts.corruptions:
            for s in self.opts.severities:
                d = root / name / str(s)
                if not d.is_dir():
                    missing.append(f"{name}/{s}")
                    continue
                ds, labels, _ = open_class_folder(d, self.classes, f"{spec.column} {name}/{s}")
                idx = subset_indices(len(ds), self.opts.max_images, self.opts.seed)
                r = self._eval(BenchmarkView(ds, idx, self._crop(), labels=labels), f"{name}/{s}")
                acc.setdefault(name, {})[int(s)] = r["top1"]
                n = r["n"]
        if not acc:
            raise SyncoError(f"'{root}' holds none of the requested <corruption>/<severity> folders "
                             f"(e.g. {root / self.opts.corruptions[0] / str(self.opts.severities[0])}).")
        if missing:
            self.log(f"{spec.column}: {len(missing)} corruption/severity folder(s) missing and left out of the "
                     f"mean: {preview(missing)}")
        return summarize_corruptions(acc, source=f"folder {root}", n=n, missing=missing)

    def imagenet_w(self, spec: BenchmarkSpec):
        o = self.opts
        if o.imagenet_w_root is not None:
            self.folder(spec)
        elif not o.watermark_on_the_fly:
            self._skip(spec, "not given (set imagenet_w_root=DIR, or watermark_on_the_fly=true)")
        elif self._clean is None:
            self._skip(spec, "not given, and no clean set to watermark on the fly")
        else:
            def generated():
                base, idx, labels, crop = self._clean
                r = self._eval(BenchmarkView(base, idx, crop, effect=Watermark(self.size), labels=labels),
                               spec.column)
                r["source"] = "generated (imagenet-w) from the clean set"
                return r

            self._guard(spec, generated)

    def imagenet_o(self, spec: BenchmarkSpec):
        root = self._root(spec)
        if root is None:
            return
        if self._clean_scores is None:
            self._skip(spec, "needs the clean set as in-distribution, which was not evaluated")
            return

        def fpr():
            root_ = resolve_class_root(root, self.classes)
            ds = SafeImageFolder(root_, transform=None, unreadable="error")
            idx = subset_indices(len(ds), self.opts.max_images, self.opts.seed)
            r = self._eval(BenchmarkView(ds, idx, self._crop()), spec.column, want_scores=True)
            m = ood_metrics(self._clean_scores, r["scores"])
            self.log(f"{spec.column}: FPR95 {m['fpr95']:.2f}% (AUROC {m['auroc']:.2f}%), {m['n_ood']} OOD vs "
                     f"{m['n_id']} in-distribution images")
            return {**m, "root": str(root_), "score": "max softmax probability"}

        self._guard(spec, fpr)


def check_benchmark_data(opts: RobustnessOptions) -> None:
    """What a user asked for must run, or the command stops before any work (an earlier robustness.json stays):
    a benchmark folder that is given must exist (a typo would otherwise be a silent "skipped" and exit 0), and a
    benchmark named in ``benchmarks=`` (a choice, not the default of all) must have its data. Only benchmarks
    left at the default may be skipped for want of a folder."""
    chosen = specs_to_run(opts.benchmarks)
    for spec in chosen:
        value = getattr(opts, spec.option) if spec.option else None
        if value is not None and not Path(value).expanduser().is_dir():
            raise SyncoError(f"{spec.option}='{value}' does not exist or is not a folder, so {spec.column} cannot "
                             "be evaluated. Fix the path, or leave the option out to skip that benchmark.")
    if sorted(set(opts.benchmarks)) == sorted(GROUPS):
        return
    generated = {"corruption": opts.corruption_on_the_fly, "watermark": opts.watermark_on_the_fly}
    for spec in chosen:
        if spec.group not in opts.benchmarks or not spec.option or getattr(opts, spec.option) is not None:
            continue
        if not generated.get(spec.kind, False):
            raise SyncoError(f"benchmarks={list(opts.benchmarks)} asks for {spec.column} ({spec.group}), but "
                             f"{spec.option} is not given. Set {spec.option}=DIR, or drop {spec.group} from "
                             "benchmarks=.")


def run_robustness(checkpoint: str, head_path: str, out: Path, opts: RobustnessOptions,
                   progress: bool = True) -> dict:
    check_benchmark_data(opts)  # before the model is loaded
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    model, classes, size, meta, _ = load_classifier(checkpoint, head_path, opts, device)
    log = print if dist.is_main() else (lambda s: None)
    summary = RobustnessEvaluator(model, classes, opts, size, device, progress=progress, log=log).run()
    result = {"protocol": "robustness", "checkpoint": checkpoint, "linear_head": str(head_path),
              "backbone": meta["backbone"], "image_size": size, **summary, "options": asdict(opts)}
    if dist.is_main():
        save_result(out, "robustness", result)
        print(robustness_tables(result))
    return result
