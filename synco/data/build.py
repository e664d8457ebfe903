"""One entry point from a dataset name (config / CLI) to a Dataset with ``.classes`` and ``.targets``.

Names:
  * ``digits``: scikit-learn digits, offline; ``root`` is ignored; splits "train" / "test".
  * ``imagenet100``: an ImageNet-style folder restricted to the shipped 100-class list.
  * ``folder``: any ImageFolder-style dataset.

Folder layout (``imagenet100`` and ``folder``): ``root/train/<class>/<image>`` and
``root/val/<class>/<image>``. A root holding class folders directly (no ``train/`` or
``val/``) is accepted as the train split only. ``split="test"`` means ``val`` for folders,
and ``split="val"`` means ``test`` for digits, so one config works with every dataset.
"""

from __future__ import annotations

from pathlib import Path

from synco.data.digits import DigitsDataset
from synco.data.folder import SafeImageFolder, load_class_list
from synco.errors import SyncoError

DATASETS = ("digits", "imagenet100", "folder")
LAYOUT = "root/train/<class>/<image> and root/val/<class>/<image>"


def _split_dir(root: Path, split: str) -> Path:
    split = {"test": "val"}.get(split, split)
    if split not in ("train", "val"):
        raise SyncoError(f"Unknown split {split!r} for a folder dataset. Use 'train' or 'val'.")
    if not root.is_dir():
        raise SyncoError(f"Dataset root {str(root)!r} does not exist or is not a directory. "
                         f"Expected the layout {LAYOUT}.")
    if (root / split).is_dir():
        return root / split
    if split == "train" and not (root / "val").exists():
        return root  # flat layout: class folders directly under root
    raise SyncoError(f"Dataset root {str(root)!r} has no {split}/ folder. Expected the layout {LAYOUT}; "
                     f"a root holding class folders directly can only serve as the train split.")


def check_split_dirs(root, splits=("train", "val")) -> None:
    """That ``root`` holds the folders of ``splits`` (see :func:`_split_dir`), before any work that will need them."""
    for split in splits:
        _split_dir(Path(root), split)


def create_dataset(name: str, root=None, split: str = "train", transform=None, class_list=None,
                   image_size: int = 32, bad_image_log=None, lazy: bool = False, unreadable: str = "replace"):
    """Build dataset ``name`` (see module docstring). ``class_list`` is a list of class folder names,
    a class-list file or a shipped list name; for ``imagenet100`` it defaults to the shipped list. ``lazy``: folder
    images are opened, not decoded; ``unreadable``: what an unreadable image becomes (replaced, an error, left out; see
    :class:`~synco.data.folder.SafeImageFolder`)."""
    if name == "digits":
        if class_list is not None:
            raise SyncoError("The digits dataset always has the 10 classes 0-9; a class_list cannot be used "
                             "with it. Remove class_list or use a folder dataset.")
        return DigitsDataset({"val": "test"}.get(split, split), transform=transform, image_size=image_size)
    if name not in DATASETS:
        raise SyncoError(f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)}.")
    if root is None:
        raise SyncoError(f"Dataset {name!r} needs a root directory with the layout {LAYOUT}.")
    if name == "imagenet100" and class_list is None:
        class_list = "imagenet100"
    if isinstance(class_list, (str, Path)):
        class_list = load_class_list(class_list)
    return SafeImageFolder(_split_dir(Path(root), split), transform=transform, class_list=class_list,
                           bad_image_log=bad_image_log, lazy=lazy, unreadable=unreadable)


def count_classes(name: str, root=None, class_list=None, split: str = "train"):
    """How many classes ``create_dataset`` would give, from folder names only (no image is listed), or None
    when that cannot be told cheaply; layout errors are the same clear errors ``create_dataset`` raises."""
    if name == "digits":
        return 10
    if name not in DATASETS or root is None:
        return None
    if name == "imagenet100" and class_list is None:
        class_list = "imagenet100"
    if isinstance(class_list, (str, Path)):
        class_list = load_class_list(class_list)
    if class_list is not None:
        return len(set(class_list))
    folder = _split_dir(Path(root), split)
    return sum(1 for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))
