"""Matching a dataset's classes to a linear head's, by name (wnid), never by position.

A benchmark folder may hold fewer classes than the head (ImageNet-A/-R: 200), extra ones, or, for
ImageNet-v2, integer folder names that are class indices; every label a head is scored on goes through
:func:`class_index_map`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..data.folder import SafeImageFolder
from ..errors import SyncoError


def class_index_map(folder_classes: Sequence[str], head_classes: Sequence[str]) -> dict[str, int]:
    """Folder name -> head class index, by name (wnid). When no folder name is a head class, all are integers
    (ImageNet-v2's ``0..999``) and the head has the 1000 ImageNet classes, they are read as class indices
    (ImageNet-v2 numbers the classes in sorted-wnid order, which is the order of a head trained on an
    ImageNet folder). A head whose classes are ImageNet wnids (ImageNet-100) maps them through the wnid list."""
    index = {str(c): i for i, c in enumerate(head_classes)}
    out = {name: index[name] for name in folder_classes if name in index}
    integers = bool(folder_classes) and all(n.isdigit() for n in folder_classes)
    if not out and integers and len(head_classes) == 1000 and list(head_classes) == sorted(head_classes):
        out = {n: int(n) for n in folder_classes if int(n) < len(head_classes)}
    if not out and integers and all(WNID.match(str(c)) for c in head_classes):
        # A head on a subset of ImageNet (ImageNet-100): integer folder -> its ImageNet-1k wnid -> the head's
        # class of that wnid; the folders of classes the head lacks are left out.
        wnids = imagenet_wnids()
        out = {n: index[wnids[int(n)]] for n in folder_classes if int(n) < len(wnids) and wnids[int(n)] in index}
    return out


WNID = re.compile(r"^n\d{8}$")


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order, the order ImageNet-v2 numbers its folders in (timm ships
    the list: no download)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def head_labels(dataset_classes: Sequence[str], head_classes: Sequence[str]) -> tuple[list[int], list[str]]:
    """(head index of each dataset class, the dataset classes the head lacks); the labels are complete
    only when the second list is empty."""
    mapping = class_index_map(list(dataset_classes), head_classes)
    missing = [c for c in dataset_classes if c not in mapping]
    return [mapping.get(c, -1) for c in dataset_classes], missing


def masked_argmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """argmax over the ``allowed`` class indices only, returned as full class indices."""
    allowed = allowed.to(logits.device)
    return allowed[logits.index_select(1, allowed).argmax(dim=1)]


def preview(names, n: int = 4) -> str:
    """The first ``n`` names, and how many there are in all: for messages about long class lists."""
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def class_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def resolve_class_root(path: Path, head_classes: Sequence[str]) -> Path:
    """The folder holding the class folders: ``path``, or its only sub-folder (an extracted archive's
    top folder such as ``imagenet-a/`` or ``sketch/``), up to two levels down."""
    names = set(map(str, head_classes))
    for _ in range(3):
        dirs = class_dirs(path)
        if any(d in names for d in dirs) or len(dirs) != 1 or not class_dirs(path / dirs[0]):
            return path
        path = path / dirs[0]
    return path


def open_class_folder(root: Path, head_classes: Sequence[str], what: str):
    """(SafeImageFolder restricted to the classes the head knows, label map to head indices, class root)."""
    root = resolve_class_root(root, head_classes)
    present = class_dirs(root)
    if not present:
        raise SyncoError(f"{what}: '{root}' has no class sub-folders (expected <class>/<image>).")
    mapping = class_index_map(present, head_classes)
    if not mapping:
        hint = (" Integer folders (ImageNet-v2) are read as indices into the 1000 ImageNet classes only with a "
                "1000-class head or a head whose classes are ImageNet wnids." if all(n.isdigit() for n in present)
                else "")
        raise SyncoError(f"{what}: none of the {len(present)} class folders in '{root}' ({preview(present)}) is a "
                         f"class of the linear head ({preview(map(str, head_classes))}); folders must be named "
                         f"by the head's class names (wnids).{hint}")
    unknown = [n for n in present if n not in mapping]
    if unknown:
        warnings.warn(f"{what}: {len(unknown)} class folder(s) in '{root}' are not classes of the linear head and "
                      f"are left out: {preview(unknown)}", stacklevel=2)
    ds = SafeImageFolder(root, transform=None, class_list=sorted(mapping), unreadable="error")
    return ds, [mapping[c] for c in ds.classes], root
