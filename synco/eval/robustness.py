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
corruptions and the watermark are applied to the cropped uint8 image, as ImageNet-C/-W were made. A benchmark
that is not given or not on disk is skipped with a message; the others still run.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..data.build import build_dataset
from ..data.folder import SafeImageFolder
from ..data.transforms import BICUBIC
from ..engine import dist as D
from ..errors import SyncoError
from .common import EvalOptions, load_eval_backbone, resolve_device
from .head import Classifier, load_head
from .ood import max_softmax_probability, ood_metrics
from .results import markdown_table, save_result

# ImageNet-C's 15 corruptions by family (Hendrycks & Dietterich 2019), in the paper's order.
CORRUPTION_FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    # The four held-out corruptions of ImageNet-C; never part of the mean unless asked for.
    "extra": ("speckle_noise", "gaussian_blur", "spatter", "saturate"),
}
IMAGENET_C = tuple(c for fam in ("noise", "blur", "weather", "digital") for c in CORRUPTION_FAMILIES[fam])
FAMILY_OF = {c: fam for fam, names in CORRUPTION_FAMILIES.items() for c in names}
SEVERITIES = (1, 2, 3, 4, 5)

# ImageNet-v2 variants: Table 13 column -> accepted folder names (after dropping 'imagenetv2-' and '-format-val').
IMAGENET_V2_VARIANTS: dict[str, tuple[str, ...]] = {
    "MF": ("matched-frequency", "matched_frequency", "matchedfrequency", "mf"),
    "T-0.7": ("threshold0.7", "threshold-0.7", "threshold_0.7", "t0.7", "t-0.7"),
    "TI": ("top-images", "top_images", "topimages", "ti"),
}

# Result keys, their Table 13 columns and option names, in the table's order.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "clean": ("IN", "dataset/root"),
    "imagenet_v2_mf": ("MF", "imagenet_v2_root"),
    "imagenet_v2_t07": ("T-0.7", "imagenet_v2_root"),
    "imagenet_v2_ti": ("TI", "imagenet_v2_root"),
    "imagenet_c": ("IN-C", "imagenet_c_root"),
    "imagenet_a": ("IN-A", "imagenet_a_root"),
    "imagenet_w": ("IN-W", "imagenet_w_root"),
    "imagenet_sketch": ("IN-S", "imagenet_sketch_root"),
    "imagenet_r": ("IN-R", "imagenet_r_root"),
    "imagenet_o": ("IN-O", "imagenet_o_root"),
}
V2_KEYS = {"MF": "imagenet_v2_mf", "T-0.7": "imagenet_v2_t07", "TI": "imagenet_v2_ti"}
GROUPS = ("clean", "v2", "c", "a", "w", "sketch", "r", "o")  # the `benchmarks` option picks among these


@dataclass
class RobustnessOptions(EvalOptions):
    imagenet_v2_root: Optional[str] = None  # holds the three variant folders (or is one of them)
    imagenet_sketch_root: Optional[str] = None
    imagenet_w_root: Optional[str] = None
    imagenet_c_root: Optional[str] = None  # <corruption>/<severity>/<wnid>/<image>
    imagenet_a_root: Optional[str] = None
    imagenet_r_root: Optional[str] = None
    imagenet_o_root: Optional[str] = None
    corruptions: list = field(default_factory=lambda: list(IMAGENET_C))
    severities: list = field(default_factory=lambda: list(SEVERITIES))
    corruption_on_the_fly: bool = True  # no imagenet_c_root: corrupt the clean set with corrupt-tta
    watermark_on_the_fly: bool = True  # no imagenet_w_root: watermark the clean set with imagenet-w
    benchmarks: list = field(default_factory=lambda: list(GROUPS))
    max_images: Optional[int] = None  # per evaluated set: a fixed random subset (seed) of at most this many
    crop_ratio: Optional[float] = None  # default 224/256 (1.0 for the clean digits set)


# ---------------------------------------------------------------------------------------------
# Preprocessing: centre crop, then an optional image effect, then to a normalised tensor


def center_crop_ops(size: int, crop_ratio: float) -> list:
    """uint8 CHW tensor at ``size``: the first half of :func:`synco.data.transforms.eval_transform`."""
    return [v2.ToImage(), v2.Resize(round(int(size) / crop_ratio), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(int(size))]


def to_model_input(normalize: bool = True) -> v2.Compose:
    ops = [v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        ops.append(v2.Normalize(mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD)))
    return v2.Compose(ops + [v2.ToPureTensor()])


def _sample_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


class Corruption:
    """One corrupt-tta corruption at one severity on a uint8 CHW tensor, seeded per sample.

    corrupt-tta draws from NumPy's global generator (and scikit-image's ``random_noise`` from a fresh
    one); both are seeded from (seed, corruption, severity, sample index) and the global state is
    restored, so a generated benchmark is the same in every run and every DataLoader worker.
    """

    def __init__(self, name: str, severity: int, seed: int = 0):
        check_corruptions([name], [severity])
        self.name, self.severity, self.seed = name, int(severity), int(seed)
        self.code = sorted(FAMILY_OF).index(name)

    def __call__(self, img: torch.Tensor, index: int) -> torch.Tensor:
        import corrupt_tta

        x = img.permute(1, 2, 0).numpy()
        if x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)
        seed = _sample_seed(self.seed, self.code, self.severity, index)
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            if self.name == "impulse_noise":
                y = _impulse_noise(x, self.severity, seed)
            else:
                y = corrupt_tta.corrupt(x, severity=self.severity, corruption_name=self.name)
        finally:
            np.random.set_state(state)
        y = np.clip(np.rint(np.asarray(y, dtype=np.float64)), 0, 255).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(y)).permute(2, 0, 1)


def _impulse_noise(x: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """corrupt-tta's impulse_noise (ImageNet-C's salt & pepper amounts) with a seeded generator."""
    from skimage.util import random_noise

    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    out = random_noise(x / 255.0, mode="s&p", amount=amount, rng=np.random.default_rng(seed))
    return np.clip(out, 0, 1) * 255


class Watermark:
    """The ImageNet-W watermark (imagenet-w's ``AddWatermark``) on a uint8 CHW tensor."""

    def __init__(self, size: int):
        self.size = int(size)
        self._fn = None

    def __getstate__(self):  # the loaded font stays in the process that made it
        return {"size": self.size, "_fn": None}

    def __call__(self, img: torch.Tensor, index: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        if self._fn is None:
            from imagenet_w import AddWatermark

            self._fn = AddWatermark(self.size)
        return TF.pil_to_tensor(self._fn(TF.to_pil_image(img)).convert("RGB"))


def check_corruptions(names: Sequence[str], severities: Sequence[int]) -> None:
    bad = [n for n in names if n not in FAMILY_OF]
    if bad:
        raise SyncoError(f"unknown corruption(s) {', '.join(map(str, bad))}; choose from the 15 ImageNet-C ones "
                         f"({', '.join(IMAGENET_C)}) or the extra {', '.join(CORRUPTION_FAMILIES['extra'])}.")
    bad_s = [s for s in severities if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5]
    if bad_s:
        raise SyncoError(f"severities must be integers 1..5, got {bad_s}.")


class BenchmarkView(Dataset):
    """``base[indices[i]]`` (a PIL image) -> centre crop -> ``effect(img, i)`` -> model input, head label.

    ``labels`` maps the base dataset's targets to the linear head's class indices (-1: unknown)."""

    def __init__(self, base, indices: Sequence[int], crop: list, effect: Optional[Callable] = None,
                 labels: Optional[Sequence[int]] = None, normalize: bool = True):
        self.base, self.indices = base, list(indices)
        self.crop, self.post = v2.Compose(crop), to_model_input(normalize)
        self.effect, self.labels = effect, None if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, target = self.base[self.indices[i]]
        x = self.crop(img)
        if self.effect is not None:
            x = self.effect(x, self.indices[i])
        return self.post(x), (self.labels[target] if self.labels is not None else int(target))


def subset_indices(n: int, max_images: Optional[int], seed: int) -> list[int]:
    """All of ``range(n)``, or a fixed random subset of ``max_images`` of them (sorted)."""
    if max_images is None or max_images >= n:
        return list(range(n))
    if max_images < 1:
        raise SyncoError(f"max_images must be at least 1, got {max_images}.")
    return sorted(np.random.default_rng(seed).permutation(n)[:max_images].tolist())


# ---------------------------------------------------------------------------------------------
# Class matching by name


def class_index_map(folder_classes: Sequence[str], head_classes: Sequence[str]) -> dict[str, int]:
    """Folder name -> head class index, by name (wnid). When no folder name is a head class, all are integers
    (ImageNet-v2's ``0..999``) and the head has the 1000 ImageNet classes, they are read as class indices
    (ImageNet-v2 numbers the classes in sorted-wnid order, which is the order of a head trained on an
    ImageNet folder)."""
    index = {str(c): i for i, c in enumerate(head_classes)}
    out = {name: index[name] for name in folder_classes if name in index}
    if (not out and folder_classes and len(head_classes) == 1000 and all(n.isdigit() for n in folder_classes)
            and list(head_classes) == sorted(head_classes)):
        out = {n: int(n) for n in folder_classes if int(n) < len(head_classes)}
    return out


def masked_argmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """argmax over the ``allowed`` class indices only, returned as full class indices."""
    allowed = allowed.to(logits.device)
    return allowed[logits.index_select(1, allowed).argmax(dim=1)]


def _preview(names, n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _class_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def resolve_class_root(path: Path, head_classes: Sequence[str]) -> Path:
    """The folder holding the class folders: ``path``, or its only sub-folder (an extracted archive's
    top folder such as ``imagenet-a/`` or ``sketch/``), up to two levels down."""
    names = set(map(str, head_classes))
    for _ in range(3):
        dirs = _class_dirs(path)
        if any(d in names for d in dirs) or len(dirs) != 1 or not _class_dirs(path / dirs[0]):
            return path
        path = path / dirs[0]
    return path


def open_class_folder(root: Path, head_classes: Sequence[str], what: str):
    """(SafeImageFolder restricted to the classes the head knows, label map to head indices)."""
    root = resolve_class_root(root, head_classes)
    present = _class_dirs(root)
    if not present:
        raise SyncoError(f"{what}: '{root}' has no class sub-folders (expected <class>/<image>).")
    mapping = class_index_map(present, head_classes)
    if not mapping:
        hint = (" Integer folders (ImageNet-v2) are read as indices into the 1000 ImageNet classes only with a "
                "1000-class head." if all(n.isdigit() for n in present) else "")
        raise SyncoError(f"{what}: none of the {len(present)} class folders in '{root}' ({_preview(present)}) is a "
                         f"class of the linear head ({_preview(map(str, head_classes))}); folders must be named "
                         f"by the head's class names (wnids).{hint}")
    unknown = [n for n in present if n not in mapping]
    if unknown:
        warnings.warn(f"{what}: {len(unknown)} class folder(s) in '{root}' are not classes of the linear head and "
                      f"are left out: {_preview(unknown)}", stacklevel=2)
    ds = SafeImageFolder(root, transform=None, class_list=sorted(mapping))
    return ds, [mapping[c] for c in ds.classes], root


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                    allowed: Optional[torch.Tensor] = None, want_scores: bool = False,
                    desc: str = "eval", progress: bool = True) -> dict:
    """Top-1 (%) of ``model`` over the loader; with ``allowed``, argmax over those classes only.
    With ``want_scores`` also the MSP scores (over all classes) of every sample, in order."""
    model.eval()
    correct, n, scores = 0, 0, []
    use_bf16 = device.type == "cuda"
    for x, y in tqdm(loader, desc=desc, disable=not progress or not D.is_main(), leave=False):
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
        bad = [b for b in opts.benchmarks if b not in GROUPS]
        if bad:
            raise SyncoError(f"unknown benchmark(s) {bad}; choose among {', '.join(GROUPS)}.")
        check_corruptions(opts.corruptions, opts.severities)

    # -- helpers ----------------------------------------------------------------------------------

    def _crop(self, crop_ratio: Optional[float] = None) -> list:
        return center_crop_ops(self.size, self.opts.crop_ratio or crop_ratio or 224 / 256)

    def _loader(self, view: Dataset) -> DataLoader:
        return DataLoader(view, batch_size=self.opts.batch_size, shuffle=False, num_workers=self.opts.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _eval(self, view: Dataset, desc: str, allowed=None, want_scores=False) -> dict:
        return evaluate_loader(self.model, self._loader(view), self.device, allowed=allowed,
                               want_scores=want_scores, desc=desc, progress=self.progress)

    def _skip(self, key: str, reason: str) -> None:
        self.skipped[key] = reason
        self.log(f"skipped {BENCHMARKS[key][0]} ({key}): {reason}")

    def _root(self, key: str, option: str) -> Optional[Path]:
        value = getattr(self.opts, option)
        if value is None:
            self._skip(key, f"not given (set {option}=DIR)")
            return None
        path = Path(value).expanduser()
        if not path.is_dir():
            self._skip(key, f"{option}='{value}' does not exist or is not a directory")
            return None
        return path

    def _guard(self, key: str, fn: Callable[[], Optional[dict]]) -> None:
        try:
            res = fn()
        except SyncoError as e:
            self._skip(key, str(e))
            return
        if res is not None:
            self.results[key] = res
            if "top1" in res:
                self.log(f"{BENCHMARKS[key][0]}: top-1 {res['top1']:.2f}% on {res['n']} images")

    def _folder_top1(self, key: str, root: Path, mask: bool) -> dict:
        name = BENCHMARKS[key][0]
        ds, labels, class_root = open_class_folder(root, self.classes, name)
        idx = subset_indices(len(ds), self.opts.max_images, self.opts.seed)
        allowed = torch.as_tensor(sorted(set(labels)), dtype=torch.long) if mask else None
        res = self._eval(BenchmarkView(ds, idx, self._crop(), labels=labels), name, allowed=allowed)
        res.update({"root": str(class_root), "classes": len(set(labels)), "masked": bool(mask)})
        return res

    # -- benchmarks -------------------------------------------------------------------------------

    def clean(self):
        o = self.opts
        if o.dataset in (None, "none"):
            self._skip("clean", "no clean validation set (dataset=none)")
            return
        split = "test" if o.dataset == "digits" else "val"
        try:
            base = build_dataset(o.dataset, root=o.root, split=split, transform=None, class_list=o.class_list,
                                 image_size=self.size)
        except SyncoError as e:
            self._skip("clean", str(e))
            return
        mapping = class_index_map(list(base.classes), self.classes)
        missing = [c for c in base.classes if c not in mapping]
        if missing:
            self._skip("clean", f"the clean set's classes {_preview(missing)} are not classes of the linear head "
                                f"({_preview(self.classes)}): was the head trained on another dataset?")
            return
        labels = [mapping[c] for c in base.classes]
        idx = subset_indices(len(base), o.max_images, o.seed)
        crop = self._crop(1.0 if o.dataset == "digits" else 224 / 256)
        self._clean = (base, idx, labels, crop)
        want = "o" in o.benchmarks
        res = self._eval(BenchmarkView(base, idx, crop, labels=labels), "clean", want_scores=want)
        self._clean_scores = res.pop("scores", None)
        res["dataset"] = o.dataset
        self.results["clean"] = res
        self.log(f"IN (clean {o.dataset}): top-1 {res['top1']:.2f}% on {res['n']} images")

    def imagenet_v2(self):
        root = self.opts.imagenet_v2_root
        if root is None or not Path(root).expanduser().is_dir():
            for key in V2_KEYS.values():
                self._root(key, "imagenet_v2_root")
            return
        found = find_v2_variants(Path(root).expanduser())
        for column, key in V2_KEYS.items():
            if column not in found:
                self._skip(key, f"no {column} folder in '{root}' (expected one of "
                                f"imagenetv2-{IMAGENET_V2_VARIANTS[column][0]}-format-val, ...)")
                continue
            self._guard(key, lambda p=found[column], k=key: self._folder_top1(k, p, mask=False))

    def imagenet_c(self):
        o = self.opts
        if o.imagenet_c_root is not None:
            root = self._root("imagenet_c", "imagenet_c_root")
            if root is not None:
                self._guard("imagenet_c", lambda: self._imagenet_c_folder(root))
            return
        if not o.corruption_on_the_fly:
            self._skip("imagenet_c", "not given (set imagenet_c_root=DIR, or corruption_on_the_fly=true)")
        elif self._clean is None:
            self._skip("imagenet_c", "not given, and no clean set to corrupt on the fly")
        elif not o.corruptions:
            self._skip("imagenet_c", "corruptions=[] selects none")
        else:
            self._guard("imagenet_c", self._imagenet_c_generated)

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

    def _imagenet_c_folder(self, root: Path) -> dict:
        acc: dict[str, dict[int, float]] = {}
        missing, n = [], 0
        for name in self.opts.corruptions:
            for s in self.opts.severities:
                d = root / name / str(s)
                if not d.is_dir():
                    missing.append(f"{name}/{s}")
                    continue
                ds, labels, _ = open_class_folder(d, self.classes, f"IN-C {name}/{s}")
                idx = subset_indices(len(ds), self.opts.max_images, self.opts.seed)
                r = self._eval(BenchmarkView(ds, idx, self._crop(), labels=labels), f"{name}/{s}")
                acc.setdefault(name, {})[int(s)] = r["top1"]
                n = r["n"]
        if not acc:
            raise SyncoError(f"'{root}' holds none of the requested <corruption>/<severity> folders "
                             f"(e.g. {root / self.opts.corruptions[0] / str(self.opts.severities[0])}).")
        if missing:
            self.log(f"IN-C: {len(missing)} corruption/severity folder(s) missing and left out of the mean: "
                     f"{_preview(missing)}")
        return summarize_corruptions(acc, source=f"folder {root}", n=n, missing=missing)

    def imagenet_w(self):
        o = self.opts
        if o.imagenet_w_root is not None:
            root = self._root("imagenet_w", "imagenet_w_root")
            if root is not None:
                self._guard("imagenet_w", lambda: self._folder_top1("imagenet_w", root, mask=False))
            return
        if not o.watermark_on_the_fly:
            self._skip("imagenet_w", "not given (set imagenet_w_root=DIR, or watermark_on_the_fly=true)")
        elif self._clean is None:
            self._skip("imagenet_w", "not given, and no clean set to watermark on the fly")
        else:
            def generated():
                base, idx, labels, crop = self._clean
                r = self._eval(BenchmarkView(base, idx, crop, effect=Watermark(self.size), labels=labels), "IN-W")
                r["source"] = "generated (imagenet-w) from the clean set"
                return r

            self._guard("imagenet_w", generated)

    def imagenet_o(self):
        root = self._root("imagenet_o", "imagenet_o_root")
        if root is None:
            return
        if self._clean_scores is None:
            self._skip("imagenet_o", "needs the clean set as in-distribution, which was not evaluated")
            return

        def fpr():
            root_ = resolve_class_root(root, self.classes)
            ds = SafeImageFolder(root_, transform=None)
            idx = subset_indices(len(ds), self.opts.max_images, self.opts.seed)
            r = self._eval(BenchmarkView(ds, idx, self._crop()), "IN-O", want_scores=True)
            m = ood_metrics(self._clean_scores, r["scores"])
            self.log(f"IN-O: FPR95 {m['fpr95']:.2f}% (AUROC {m['auroc']:.2f}%), {m['n_ood']} OOD vs {m['n_id']} "
                     "in-distribution images")
            return {**m, "root": str(root_), "score": "max softmax probability"}

        self._guard("imagenet_o", fpr)

    def run(self) -> dict:
        b = set(self.opts.benchmarks)
        if "clean" in b or "c" in b or "w" in b or "o" in b:
            self.clean()
        if "v2" in b:
            self.imagenet_v2()
        if "c" in b:
            self.imagenet_c()
        if "a" in b:
            root = self._root("imagenet_a", "imagenet_a_root")
            if root is not None:
                self._guard("imagenet_a", lambda: self._folder_top1("imagenet_a", root, mask=True))
        if "w" in b:
            self.imagenet_w()
        if "sketch" in b:
            root = self._root("imagenet_sketch", "imagenet_sketch_root")
            if root is not None:
                self._guard("imagenet_sketch", lambda: self._folder_top1("imagenet_sketch", root, mask=False))
        if "r" in b:
            root = self._root("imagenet_r", "imagenet_r_root")
            if root is not None:
                self._guard("imagenet_r", lambda: self._folder_top1("imagenet_r", root, mask=True))
        if "o" in b:
            self.imagenet_o()
        if "clean" not in b:
            self.results.pop("clean", None)
        return {"results": self.results, "skipped": self.skipped, "table13": table13_row(self.results)}


def find_v2_variants(root: Path) -> dict[str, Path]:
    """Table 13 column -> folder, from a folder holding the variants (or being one of them)."""
    def variant(name: str) -> Optional[str]:
        n = name.lower()
        n = n[len("imagenetv2-"):] if n.startswith("imagenetv2-") else n
        n = n[: -len("-format-val")] if n.endswith("-format-val") else n
        for column, aliases in IMAGENET_V2_VARIANTS.items():
            if n in aliases:
                return column
        return None

    own = variant(root.name)
    if own is not None:
        return {own: root}
    out = {}
    for d in _class_dirs(root):
        column = variant(d)
        if column is not None and column not in out:
            out[column] = root / d
    return out


def summarize_corruptions(acc: dict[str, dict[int, float]], source: str, n: int,
                          missing: Optional[list] = None) -> dict:
    """Mean top-1 over all (corruption, severity) pairs, plus per corruption / family / severity means."""
    values = [v for per in acc.values() for v in per.values()]
    fams: dict[str, list[float]] = {}
    sevs: dict[int, list[float]] = {}
    for name, per in acc.items():
        fams.setdefault(FAMILY_OF[name], []).extend(per.values())
        for s, v in per.items():
            sevs.setdefault(int(s), []).append(v)
    return {
        "top1": float(np.mean(values)), "n": n, "source": source,
        "per_corruption": {name: {str(s): v for s, v in sorted(per.items())} for name, per in acc.items()},
        "corruption_mean": {name: float(np.mean(list(per.values()))) for name, per in acc.items()},
        "per_family": {f: float(np.mean(fams[f])) for f in CORRUPTION_FAMILIES if f in fams},
        "per_severity": {str(s): float(np.mean(v)) for s, v in sorted(sevs.items())},
        "missing": list(missing or []),
    }


def table13_row(results: dict) -> dict:
    """The Table 13 columns (IN, MF, T-0.7, TI, IN-C, IN-A, IN-W, IN-S, IN-R, IN-O); None where not run."""
    row = {}
    for key, (column, _) in BENCHMARKS.items():
        r = results.get(key)
        row[column] = None if r is None else float(r["fpr95"] if key == "imagenet_o" else r["top1"])
    return row


# ---------------------------------------------------------------------------------------------
# Loading the classifier and the command


def load_classifier(checkpoint: str, head_path: str, opts: EvalOptions, device: torch.device):
    """(backbone + linear head in eval mode, head class names, image size, backbone meta, head file state)."""
    backbone, meta = load_eval_backbone(checkpoint, opts, device)
    head, state = load_head(head_path, expect_dim=int(backbone.num_features))
    trained_on = (state.get("backbone") or {}).get("backbone")
    if trained_on and trained_on != meta.get("backbone"):
        warnings.warn(f"the linear head was trained on backbone '{trained_on}' but the checkpoint is "
                      f"'{meta.get('backbone')}'.", stacklevel=2)
    classes = [str(c) for c in state.get("classes") or range(head.linear.out_features)]
    size = int(opts.image_size or state.get("image_size") or 0)
    if not size:
        from ..models.backbone import input_size

        size = input_size(backbone)
    return Classifier(backbone, head).to(device).eval(), classes, size, meta, state


def robustness_tables(summary: dict) -> str:
    res, parts = summary["results"], []
    rows = []
    for key, (column, _) in BENCHMARKS.items():
        r = res.get(key)
        if r is None:
            rows.append({"benchmark": column, "images": None, "metric": None,
                         "value": None, "note": "skipped: " + summary["skipped"].get(key, "not requested")})
        elif key == "imagenet_o":
            rows.append({"benchmark": column, "images": r["n_ood"], "metric": "FPR95 (%) ↓", "value": r["fpr95"],
                         "note": f"AUROC {r['auroc']:.2f}"})
        else:
            note = r.get("source") or ("logits restricted to the classes present" if r.get("masked") else "")
            rows.append({"benchmark": column, "images": r["n"], "metric": "top-1 (%)", "value": r["top1"],
                         "note": note})
    parts.append(markdown_table(rows, ["benchmark", "images", "metric", "value", "note"]))
    c = res.get("imagenet_c")
    if c is not None:
        sevs = sorted({s for per in c["per_corruption"].values() for s in per}, key=int)
        crow = [{"family": FAMILY_OF[name], "corruption": name, **{f"s{s}": per.get(s) for s in sevs},
                 "mean": c["corruption_mean"][name]} for name, per in c["per_corruption"].items()]
        parts.append(markdown_table(crow, ["family", "corruption", *[f"s{s}" for s in sevs], "mean"]))
        frow = {"clean": res.get("clean", {}).get("top1"), **c["per_family"], "IN-C mean": c["top1"]}
        parts.append(markdown_table([frow], list(frow)))
        srow = {"clean": res.get("clean", {}).get("top1"), **{f"severity {s}": v for s, v in c["per_severity"].items()}}
        parts.append(markdown_table([srow], list(srow)))
    row = summary["table13"]
    parts.append("Table 13 row:\n" + markdown_table([{k: (v if v is not None else "—") for k, v in row.items()}],
                                                    list(row)))
    return "\n\n".join(parts)


def run_robustness(checkpoint: str, head_path: str, out: Path, opts: RobustnessOptions,
                   progress: bool = True) -> dict:
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    model, classes, size, meta, _ = load_classifier(checkpoint, head_path, opts, device)
    log = print if D.is_main() else (lambda s: None)
    summary = RobustnessEvaluator(model, classes, opts, size, device, progress=progress, log=log).run()
    result = {"protocol": "robustness", "checkpoint": checkpoint, "linear_head": str(head_path),
              "backbone": meta["backbone"], "image_size": size, **summary, "options": asdict(opts)}
    if D.is_main():
        save_result(out, "robustness", result)
        print(robustness_tables(result))
    return result
