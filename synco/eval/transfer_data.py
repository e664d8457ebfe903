"""How the files of each transfer dataset (transfer.py) become train/test views: samples of torchvision's
dataset classes with their targets, the splits torchvision does not give (Caltech-101, SUN397's fallback), VOC's
multi-hot labels, and the checks that name a damaged file."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from ..data.folder import unreadable_eval_image
from ..errors import SyncoError

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


class ToRGB:
    def __call__(self, img):
        return img.convert("RGB") if hasattr(img, "convert") else img


def _base_image(base, j):
    return base[j][0]


class SplitView(Dataset):
    """Samples ``(base, index)`` of torchvision datasets, as RGB images through ``transform``, with the
    given targets (class index, or a multi-hot float vector for VOC)."""

    def __init__(self, items: list, targets: list, classes: list, transform=None,
                 load: Optional[Callable] = None):
        self.items, self.targets, self.classes, self.transform = items, targets, classes, transform
        self.load = load or _base_image
        self._rgb = ToRGB()

    def __len__(self) -> int:
        return len(self.items)

    def with_transform(self, transform) -> SplitView:
        return SplitView(self.items, self.targets, self.classes, transform, self.load)

    def __getitem__(self, i: int):
        """Sample ``i``; an image that is missing or cannot be decoded stops the evaluation naming the file, as
        every evaluation does (:func:`~synco.data.folder.unreadable_eval_image`): a neighbour in its place would
        be counted twice and the numbers would be of another image set."""
        base, j = self.items[i]
        try:
            img = self._rgb(self.load(base, j))
            img.load()
        except Exception as exc:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, ...)
            raise unreadable_eval_image(_image_path(base, j), exc) from None
        if self.transform is not None:
            img = self.transform(img)
        t = self.targets[i]
        return img, (torch.as_tensor(t, dtype=torch.float32) if isinstance(t, list) else t)


def _image_path(base, j) -> str:
    """The file behind sample ``j`` of a torchvision dataset, for messages (its index when unknown)."""
    for attr in ("_image_files", "_images", "images", "_samples", "samples"):
        seq = getattr(base, attr, None)
        if isinstance(seq, (list, tuple)) and j < len(seq):
            item = seq[j]
            return str(item[0] if isinstance(item, tuple) else item)
    return f"{type(base).__name__}[{j}]"


def dataset_labels(ds) -> list[int]:
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    if hasattr(ds, "_samples"):  # StanfordCars
        return [int(t) for _, t in ds._samples]
    return [int(ds[i][1]) for i in range(len(ds))]


def whole_view(parts: list, classes: list) -> SplitView:
    items, targets = [], []
    for ds in parts:
        labels = dataset_labels(ds)
        items += [(ds, j) for j in range(len(ds))]
        targets += labels
    return SplitView(items, targets, classes)


def per_class_split(labels: list[int], per_class: int, seed: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list] = {}
    for i, t in enumerate(labels):
        by_class.setdefault(t, []).append(i)
    train, test = [], []
    for t in sorted(by_class):
        idx = by_class[t]
        perm = torch.randperm(len(idx), generator=g).tolist()
        train += [idx[p] for p in perm[:per_class]]
        test += [idx[p] for p in perm[per_class:]]
    return sorted(train), sorted(test)


def voc_labels(xml_path: str) -> list:
    """The multi-hot target of one VOC annotation; a file that is not well-formed XML, or an object without a
    name, is one paragraph naming the file (the label of every image must be known)."""
    try:
        objects = list(ET.parse(xml_path).getroot().iter("object"))
    except (ET.ParseError, OSError) as e:
        raise SyncoError(f"VOC2007: the annotation '{xml_path}' cannot be read ({e.__class__.__name__}: {e}). "
                         "Extract it again from the official VOCtrainval/VOCtest archives.") from None
    names = {(o.findtext("name") or "").strip() for o in objects}
    if "" in names:
        raise SyncoError(f"VOC2007: the annotation '{xml_path}' has an <object> without a <name>, so its labels "
                         "are unknown. Extract it again from the official VOCtrainval/VOCtest archives.")
    return [1.0 if c in names else 0.0 for c in VOC_CLASSES]


# MATLAB files torchvision reads, under each dataset's folder, with a variable each must hold: checked up front,
# so that a truncated or foreign file is named (scipy's errors do not name it, and a short file fails later
# with an IndexError).
MAT_FILES = {
    "cars": {"devkit/cars_meta.mat": "class_names", "devkit/cars_train_annos.mat": "annotations",
             "cars_test_annos_withlabels.mat": "annotations"},
    "flowers102": {"imagelabels.mat": "labels", "setid.mat": "trnid"},
}


def check_mat_files(name: str, folder: Path, title: str) -> None:
    import scipy.io as sio

    for rel, key in MAT_FILES.get(name, {}).items():
        path = folder / rel
        if not path.is_file():
            continue  # torchvision reports the missing file
        try:
            ok = key in sio.loadmat(str(path), squeeze_me=True, variable_names=[key])
        except Exception as e:  # noqa: BLE001 - scipy raises MatReadError, ValueError, TypeError, ...
            raise SyncoError(f"{title}: '{path}' cannot be read as a MATLAB file ({e.__class__.__name__}:"
                             f" {str(e)[:200]}); it is truncated or damaged. Extract it again from the official "
                             "archive.") from None
        if not ok:
            raise SyncoError(f"{title}: '{path}' holds no '{key}' variable; it is not the file of the "
                             "official archive. Extract it again.")


def voc_image(base, j):
    from PIL import Image

    return Image.open(base.images[j])


def sun397_split(ds, root: Path, per_class: int, seed: int) -> tuple[SplitView, SplitView]:
    """The official partition (Training_01/Testing_01) when its files are there, else ``per_class`` training images
    of each class drawn with ``seed`` and at most as many test images (``sun397_train_per_class``)."""
    # torchvision lists the images with an unsorted rglob: the order, hence the seeded fallback split, would
    # depend on the file system. Sort them (and their labels) by path first.
    order = sorted(range(len(ds._image_files)), key=lambda i: str(ds._image_files[i]))
    ds._image_files = [ds._image_files[i] for i in order]
    ds._labels = [ds._labels[i] for i in order]
    labels = dataset_labels(ds)
    for folder in (root / "SUN397", root):
        tr_f, te_f = folder / "Training_01.txt", folder / "Testing_01.txt"
        if tr_f.is_file() and te_f.is_file():
            pos = {p.relative_to(ds._data_dir).as_posix(): i for i, p in enumerate(ds._image_files)}
            tr, te = sun397_partition(tr_f, pos, ds._data_dir), sun397_partition(te_f, pos, ds._data_dir)
            break
    else:
        tr, te = per_class_split(labels, per_class, seed)
        te = cap_per_class(te, labels, per_class)
    return (SplitView([(ds, i) for i in tr], [labels[i] for i in tr], ds.classes),
            SplitView([(ds, i) for i in te], [labels[i] for i in te], ds.classes))


def sun397_partition(path: Path, pos: dict, data_dir) -> list[int]:
    """The samples a SUN397 partition file lists (``/a/abbey/sun_x.jpg``, one a line; a path written without the
    leading '/' is the same image). An image listed but not on disk is an error naming how many and the first
    few: the official split would silently become a smaller one."""
    lines = [line.strip().lstrip("/") for line in path.read_text(encoding="utf-8-sig").splitlines()]
    listed = list(dict.fromkeys(line for line in lines if line))
    missing = [line for line in listed if line not in pos]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SyncoError(f"SUN397: {len(missing)} of the {len(listed)} images the partition file '{path}' lists are "
                         f"not under '{data_dir}' ({', '.join(missing[:3])}{more}): the extraction is incomplete "
                         "or the file belongs to another copy. Extract SUN397 again, or remove Training_01.txt and "
                         "Testing_01.txt to use the seeded per-class split (sun397_train_per_class).")
    if not listed:
        raise SyncoError(f"SUN397: the partition file '{path}' lists no images (expected lines such as "
                         "/a/abbey/sun_aaalbzqrimafwbiv.jpg).")
    return [pos[line] for line in listed]


def cap_per_class(idx: list, labels: list, cap: int) -> list:
    seen: dict[int, int] = {}
    out = []
    for i in idx:
        if seen.get(labels[i], 0) < cap:
            seen[labels[i]] = seen.get(labels[i], 0) + 1
            out.append(i)
    return out
