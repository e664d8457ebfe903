"""`synco eval transfer`: linear probing (lr fixed at 1.0) and/or fine-tuning on the eleven downstream
datasets of Table 9 (SynCo-v2 supplementary), read by torchvision's dataset classes from one root.

Nothing is downloaded (``download=False``): each dataset must already sit under ``root`` where its
torchvision class looks for it (see ``SPECS`` and ``synco eval transfer --help``); a missing one is
reported up front with that path and class, before any training starts.

Splits (train / test, as in Table 9): CIFAR train/test; Flowers-102 train+val / test; Pets
trainval / test; Food-101 train / test; Cars train / test; DTD (partition 1) train+val / test;
Aircraft (variants) trainval / test; VOC 2007 trainval / test. Caltech-101 has no official split:
``caltech_train_per_class`` (30) images per class, drawn with ``seed``, train, the rest test
(torchvision drops the BACKGROUND_Google class, so 101 classes). SUN397: the official partition
``Training_01.txt`` / ``Testing_01.txt`` when found in ``root/SUN397`` (or ``root``), otherwise a
seeded 50/50 images per class split. VOC 2007 is multi-label (20 classes, an image is positive for
every class with an annotated object, "difficult" ones included), trained with binary cross-entropy
and scored by mAP (torchmetrics' MultilabelAveragePrecision, macro); every other dataset reports
top-1.

Each (dataset, mode) runs in ``<out>/transfer/<name>/`` with its own resumable checkpoint and result
JSON (a finished one is not re-run); ``<out>/transfer.json`` collects them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..data.transforms import eval_transform, train_classification_transform
from ..device import resolve_device
from ..engine import dist
from ..errors import SyncoError
from ..options import opt
from .common import EvalOptions, eval_image_size, load_eval_backbone, weights_digest
from .finetune import FinetuneHParams, finetune
from .linear import LinearHParams, linear_probe
from .probe import ProbeData, check_eval_options, check_recipe
from .results import markdown_table, save_result
from .transfer_data import (
    VOC_CLASSES,
    SplitView,
    check_mat_files,
    dataset_labels,
    per_class_split,
    sun397_split,
    voc_image,
    voc_labels,
    whole_view,
)

MODES = ("linear", "finetune")


@dataclass(frozen=True)
class TransferSpec:
    name: str  # what --datasets takes
    title: str  # as in Table 9
    tv_class: str  # the torchvision.datasets class that reads it
    location: str  # the folder under root the class looks for
    contents: str  # what that folder holds
    num_classes: int  # Table 9 (the run uses what it finds)
    multilabel: bool = False


SPECS = {s.name: s for s in [
    TransferSpec("cifar10", "CIFAR-10", "CIFAR10", "cifar-10-batches-py",
                 "data_batch_1..5, test_batch, batches.meta: the python version", 10),
    TransferSpec("cifar100", "CIFAR-100", "CIFAR100", "cifar-100-python", "train, test, meta: the python version", 100),
    TransferSpec("flowers102", "Flowers-102", "Flowers102", "flowers-102", "jpg/, imagelabels.mat, setid.mat", 102),
    TransferSpec("pets", "Pets", "OxfordIIITPet", "oxford-iiit-pet", "images/, annotations/", 37),
    TransferSpec("food101", "Food-101", "Food101", "food-101", "images/, meta/", 101),
    TransferSpec("cars", "Cars", "StanfordCars", "stanford_cars",
                 "devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat", 196),
    TransferSpec("caltech101", "Caltech-101", "Caltech101", "caltech101/101_ObjectCategories", "one folder per class",
                 101),
    TransferSpec("dtd", "DTD", "DTD", "dtd/dtd", "images/, labels/", 47),
    TransferSpec("aircraft", "Aircraft", "FGVCAircraft", "fgvc-aircraft-2013b",
                 "data/ with images/, variants.txt and the split files", 100),
    TransferSpec("sun397", "SUN397", "SUN397", "SUN397", "ClassName.txt and the a/, b/, ... class folders", 397),
    TransferSpec("voc2007", "VOC2007", "VOCDetection (year='2007')", "VOCdevkit/VOC2007",
                 "JPEGImages/, Annotations/, ImageSets/Main/ of both trainval and test", 20, multilabel=True),
]}


@dataclass
class TransferOptions(EvalOptions):
    """``root`` holds every dataset; ``dataset``/``class_list`` of the common options are not used."""

    datasets: list[str] = field(default_factory=lambda: list(SPECS))  # names: parse_names
    modes: list[str] = field(default_factory=lambda: ["linear"])
    linear: LinearHParams = field(default_factory=lambda: LinearHParams(lrs=[1.0], val_fraction=0.0))
    finetune: FinetuneHParams = field(default_factory=FinetuneHParams)
    caltech_train_per_class: int = opt(30, ge=1)
    sun397_train_per_class: int = opt(50, ge=1)  # used when the official partition files are absent


def parse_names(value, allowed, what: str) -> list[str]:
    """'a,b' / ['a', 'b'] / 'all' -> validated names (keeps the given order, drops repeats)."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", ",").split(",") if v]
    names = list(allowed) if list(value) == ["all"] else [str(v).lower() for v in value]
    unknown = [v for v in names if v not in allowed]
    if unknown or not names:
        raise SyncoError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(allowed)} (comma-separated) or all.")
    return list(dict.fromkeys(names))


def expected_path(root: Path, spec: TransferSpec) -> Path:
    return Path(root) / spec.location


def missing_message(root: Path, specs: list[TransferSpec]) -> str:
    parts = [f"{s.title} ('{s.name}') must be in {expected_path(root, s)}, holding {s.contents}; it is read "
             f"by torchvision.datasets.{s.tv_class}" for s in specs]
    return (f"{len(specs)} transfer dataset(s) not found under root={root} (synco never downloads them): "
            + ". ".join(parts) + ". Download each from its official page, or pick the ones you have with "
            "--datasets NAME,NAME.")


# ---------------------------------------------------------------------------------------------
# Datasets


def create_transfer_split(name: str, root, opts: Optional[TransferOptions] = None) -> tuple[SplitView, SplitView]:
    """(train, test) views of dataset ``name`` without transforms (set them with ``with_transform``)."""
    import torchvision.datasets as tvd

    opts = opts or TransferOptions()
    spec = SPECS[name]
    root = str(root)
    if not expected_path(Path(root), spec).exists():
        raise SyncoError(missing_message(Path(root), [spec]))
    check_mat_files(name, expected_path(Path(root), spec), spec.title)
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            tr, te = cls(root, train=True, download=False), cls(root, train=False, download=False)
            return whole_view([tr], tr.classes), whole_view([te], tr.classes)
        if name == "flowers102":
            parts = [tvd.Flowers102(root, split=s, download=False) for s in ("train", "val", "test")]
            classes = list(getattr(parts[0], "classes", [str(i) for i in range(102)]))
            return whole_view(parts[:2], classes), whole_view(parts[2:], classes)
        if name == "pets":
            tr = tvd.OxfordIIITPet(root, split="trainval", target_types="category", download=False)
            te = tvd.OxfordIIITPet(root, split="test", target_types="category", download=False)
            return whole_view([tr], tr.classes), whole_view([te], tr.classes)
        if name == "food101":
            tr, te = (tvd.Food101(root, split=s, download=False) for s in ("train", "test"))
            return whole_view([tr], tr.classes), whole_view([te], tr.classes)
        if name == "cars":
            tr, te = (tvd.StanfordCars(root, split=s, download=False) for s in ("train", "test"))
            return whole_view([tr], tr.classes), whole_view([te], tr.classes)
        if name == "caltech101":
            ds = tvd.Caltech101(root, target_type="category", download=False)
            labels = dataset_labels(ds)
            tr, te = per_class_split(labels, opts.caltech_train_per_class, opts.seed)
            return (SplitView([(ds, i) for i in tr], [labels[i] for i in tr], ds.categories),
                    SplitView([(ds, i) for i in te], [labels[i] for i in te], ds.categories))
        if name == "dtd":
            parts = [tvd.DTD(root, split=s, partition=1, download=False) for s in ("train", "val", "test")]
            return whole_view(parts[:2], parts[0].classes), whole_view(parts[2:], parts[0].classes)
        if name == "aircraft":
            tr, te = (tvd.FGVCAircraft(root, split=s, annotation_level="variant", download=False)
                      for s in ("trainval", "test"))
            return whole_view([tr], tr.classes), whole_view([te], tr.classes)
        if name == "sun397":
            return sun397_split(tvd.SUN397(root, download=False), Path(root), opts.sun397_train_per_class,
                                opts.seed)
        if name == "voc2007":
            views = []
            for s in ("trainval", "test"):
                ds = tvd.VOCDetection(root, year="2007", image_set=s, download=False)
                views.append(SplitView([(ds, j) for j in range(len(ds))], [voc_labels(a) for a in ds.annotations],
                                       list(VOC_CLASSES), load=voc_image))
            return views[0], views[1]
    except SyncoError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever torchvision's parsers raise on damaged metadata
        raise SyncoError(f"{spec.title}: torchvision.datasets.{spec.tv_class} cannot read "
                         f"{expected_path(Path(root), spec)} ({e.__class__.__name__}: {str(e)[:200]}). It should "
                         f"hold {spec.contents}, as extracted from the official archives.") from None
    raise SyncoError(f"unknown transfer dataset '{name}'")


def transfer_probe_data(name: str, root, size: int, crop_scale, opts: Optional[TransferOptions] = None) -> ProbeData:
    train, test = create_transfer_split(name, root, opts)
    t_test = eval_transform(size)
    spec = SPECS[name]
    return ProbeData(train.with_transform(train_classification_transform(size, crop_scale=tuple(crop_scale))),
                     train.with_transform(t_test), test.with_transform(t_test), list(train.classes),
                     None if spec.multilabel else list(train.targets), spec.multilabel, name)


# ---------------------------------------------------------------------------------------------
# The protocol


def _done(path: Path, fp: dict) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
    except ValueError:
        return None
    return res if res.get("fingerprint") == fp else None


def _check_transfer_options(opts: TransferOptions) -> None:
    """Every setting, and every dataset asked for present under ``root``, before any training; the names of
    ``datasets`` and ``modes`` are made canonical in place."""
    names = parse_names(opts.datasets, list(SPECS), "transfer dataset(s)")
    modes = parse_names(opts.modes, list(MODES), "transfer mode(s)")
    opts.datasets, opts.modes = names, modes
    check_recipe(opts.linear, "linear.")
    check_recipe(opts.finetune, "finetune.")
    check_eval_options(opts)
    if not opts.root:
        raise SyncoError("synco eval transfer needs root=DIR, the folder holding the datasets "
                         f"({', '.join(s.location for s in SPECS.values())}).")
    missing = [SPECS[n] for n in names if not expected_path(Path(opts.root), SPECS[n]).exists()]
    if missing:
        raise SyncoError(missing_message(Path(opts.root), missing))


def _transfer_one(checkpoint: str, opts: TransferOptions, name: str, mode: str, sub: Path, device,
                  progress: bool) -> tuple[dict, dict]:
    """(result, backbone meta) of one (dataset, mode) on fresh weights; a finished result with the same
    fingerprint in ``sub`` is read back instead of trained again."""
    backbone, meta = load_eval_backbone(checkpoint, opts, device)  # fresh weights for every run
    size = eval_image_size(opts, backbone)
    hp = opts.linear if mode == "linear" else opts.finetune
    fp = {"weights": weights_digest(backbone), "dataset": name, "root": str(opts.root), "image_size": size,
          "batch_size": opts.batch_size, "seed": opts.seed, "hp": asdict(hp),
          "split": [opts.caltech_train_per_class, opts.sun397_train_per_class]}
    fp = json.loads(json.dumps(fp, default=str, sort_keys=True))
    res = _done(sub / f"{mode}.json", fp)
    if res is not None:
        return res, meta
    if dist.is_main():
        print(f"transfer: {SPECS[name].title} ({mode})", flush=True)
    data = transfer_probe_data(name, opts.root, size, hp.crop_scale, opts)
    common = dict(batch_size=opts.batch_size, num_workers=opts.num_workers, seed=opts.seed, device=device,
                  image_size=size, checkpoint=checkpoint, progress=progress, fp_extra=fp)
    if mode == "linear":
        res = linear_probe(backbone, meta, data, sub, hp, head_name="linear_head.pt", **common)
    else:
        res = finetune(backbone, meta, data, sub, hp, **common)
    res.update(part_of="transfer", fingerprint=fp)
    if dist.is_main():
        save_result(sub, mode, res)
    return res, meta


def run_transfer(checkpoint: str, out: Path, opts: TransferOptions, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    _check_transfer_options(opts)
    names, modes = opts.datasets, opts.modes
    device = resolve_device(opts.device)
    results: dict = {}
    meta = None
    for name in names:
        results[name] = {}
        for mode in modes:
            res, meta = _transfer_one(checkpoint, opts, name, mode, out / "transfer" / name, device, progress)
            metric = res["metric"]
            # Transfer has no held-out split: the number is the last epoch's test score.
            value = res["last"][metric] if mode == "linear" else res[metric]
            results[name][mode] = {"metric": metric, "value": value, "n_train": res["n_train"],
                                   "n_test": res["n_test"], "num_classes": res["num_classes"]}
    # Report columns like the papers' transfer tables: every linear column, then every fine-tune one.
    report = {f"{SPECS[name].title} ({'lin' if mode == 'linear' else 'ft'})": results[name][mode]["value"]
              for mode in modes for name in names}
    result = {"protocol": "transfer", "checkpoint": checkpoint, "backbone": meta["backbone"] if meta else None,
              "backbone_meta": meta, "dataset": "transfer", "datasets": names, "modes": modes, "results": results,
              "report": report, "options": asdict(opts), "seconds": time.perf_counter() - t0}
    if dist.is_main():
        save_result(out, "transfer", result)
        print(transfer_table(result))
    return result


def transfer_table(result: dict) -> str:
    rows = []
    for name, per_mode in result["results"].items():
        row = {"dataset": SPECS[name].title}
        for mode, r in per_mode.items():
            row[f"{mode} ({'mAP' if r['metric'] == 'map' else 'top-1'})"] = r["value"]
        rows.append(row)
    cols = ["dataset"] + [f"{m} (top-1)" for m in result["modes"]]
    if any(r["metric"] == "map" for per in result["results"].values() for r in per.values()):
        cols += [f"{m} (mAP)" for m in result["modes"]]
    return markdown_table(rows, cols)

