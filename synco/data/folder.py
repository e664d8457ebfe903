"""ImageFolder that validates its layout up front and survives corrupt images."""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from synco.errors import SyncoError

logger = logging.getLogger("synco.data")

# How many consecutive unreadable images to skip before concluding the dataset itself is broken.
MAX_SKIPS = 50
SHIPPED_CLASS_LISTS = {"imagenet100": "imagenet100.txt"}


def _preview(names, n: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_class_list(path_or_name) -> list[str]:
    """Class folder names, one per line; blank lines and ``#`` comments are ignored.

    A shipped name ("imagenet100") reads the list bundled in ``synco/resources``.
    """
    if str(path_or_name) in SHIPPED_CLASS_LISTS:
        text = (resources.files("synco") / "resources" / SHIPPED_CLASS_LISTS[str(path_or_name)]).read_text()
        source = f"shipped list {path_or_name!r}"
    else:
        path = Path(path_or_name)
        if not path.is_file():
            raise SyncoError(f"Class list {str(path)!r} does not exist. Pass a text file with one class folder "
                             f"name per line, or one of the shipped lists: {', '.join(SHIPPED_CLASS_LISTS)}.")
        try:
            # utf-8-sig: a list saved by Windows Notepad starts with a byte-order mark, which would otherwise be
            # part of the first class name (and that class "missing"); CRLF line ends are split by splitlines.
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise SyncoError(f"Class list {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}). Save it "
                             "as UTF-8 with one class folder name per line.") from None
        source = str(path)
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise SyncoError(f"Class list {source} contains no class names. Put one class folder name per line.")
    return names


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image. 16-bit and 32-bit greyscale (PNG ``I;16``, ``I``) and float (``F``) images are
    scaled to 8 bits, not clipped: PIL's ``convert("RGB")`` clips them at 255, leaving a 16-bit photo with
    a couple of grey levels."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0  # 65535 -> 255
        elif mode == "I":
            top = float(a.max()) if a.size else 0.0
            a = a / 257.0 if top > 255 and top <= 65535 else (a * 255.0 / top if top > 65535 else a)
        else:  # float: [0, 1] images are the common case
            top = float(np.nanmax(a)) if a.size else 0.0
            a = np.nan_to_num(a) * (255.0 if top <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning about palette transparency
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path) -> Image.Image:
    """torchvision's PIL loader with :func:`to_rgb`'s bit-depth handling."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


def _folder_id(path: str) -> tuple[int, int]:
    st = os.stat(path)  # follows links: the folder a link leads to
    return st.st_dev, st.st_ino


def walk_once(top: str):
    """``(folder, file names)`` of ``top`` and every folder below it, following symbolic links but entering each
    real folder at most once: a link back to a folder above it (a loop) or to one already listed is skipped with
    a warning, so no image is listed twice (``os.walk(followlinks=True)`` lists a loop's images until the path
    gets too long). A dangling link is skipped."""
    try:
        seen = {_folder_id(top)}
        up = os.path.realpath(top)
        while os.path.dirname(up) != up:  # a link to a folder above top is a loop too (it leads back into top)
            up = os.path.dirname(up)
            seen.add(_folder_id(up))
    except OSError:
        return
    for root, dirs, files in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirs):
            path = os.path.join(root, d)
            try:
                ident = _folder_id(path)
            except OSError:
                continue
            if ident in seen:
                logger.warning("not following %s: it leads to a folder above it or to one already listed (a "
                               "symbolic-link loop, or a second link to the same folder)", path)
                continue
            seen.add(ident)
            keep.append(d)
        dirs[:] = keep
        yield root, files


class UnreadableImage(Exception):
    """An image whose pixels could not be decoded (raised by :func:`decode_rgb`; the folder skips the image)."""


def open_image(path) -> Image.Image:
    """The image's header only: size and format are known, the pixels are decoded later by :func:`decode_rgb`
    (after a transform has chosen a reduced JPEG scale with ``draft``)."""
    return Image.open(path)


def decode_rgb(img: Image.Image) -> Image.Image:
    """Decode an image :func:`open_image` opened (a no-op for one already decoded) as :func:`to_rgb` RGB."""
    try:
        img.load()
        return to_rgb(img)  # a mode PIL cannot convert fails here: the same bad image
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if getattr(img, "_exclusive_fp", False) and getattr(img, "fp", None) is not None:
            img.fp.close()


def count_bad_images(bad_image_log) -> int:
    """Number of distinct image paths recorded in ``bad_image_log`` (0 if there is no log)."""
    if bad_image_log is None or not Path(bad_image_log).is_file():
        return 0
    return len({line.strip() for line in Path(bad_image_log).read_text().splitlines() if line.strip()})


UNREADABLE_MODES = ("replace", "error", "exclude")
UNREADABLE = -1  # the label of an image left out (SafeImageFolder(unreadable="exclude"))


class EvalImageError(SyncoError):
    """An image an evaluation cannot read: the whole command stops (a benchmark is not just skipped)."""


def unreadable_eval_image(path, exc: BaseException) -> EvalImageError:
    """The one-paragraph error of an evaluation that meets an image it cannot read (missing or undecodable)."""
    if isinstance(exc, FileNotFoundError):
        why = "it is missing"
    elif isinstance(exc, UnidentifiedImageError):  # its message repeats the path
        why = "not an image PIL can decode"
    else:
        why = f"{type(exc).__name__}: {str(exc)[:200]}"
    return EvalImageError(f"the image '{path}' cannot be read ({why}). An evaluation uses each listed image once and "
                          "never replaces an unreadable one (its numbers would be of another image set, not comparable "
                          "with others): replace or remove the file and run the command again (an earlier result in "
                          "--out is kept).")


class SafeImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` with clear layout errors and corrupt-image skipping.

    ``root`` holds one sub-folder per class. With ``class_list`` only those folders are used
    and the classes (and label indices) are ordered as ``sorted(class_list)``, whatever the
    order of the list, so a label means the same class in every run.

    An image that cannot be loaded is logged (``synco.data`` logger, and one line appended
    to ``bad_image_log`` when given) and the next readable sample is returned instead, so a
    few bad files cannot kill a long run. With ``lazy=True`` the loader reads only the header and the transform
    decodes (:func:`decode_rgb`), so it can choose a reduced JPEG scale first; pixels that fail to decode then are
    skipped the same way (``unreadable="replace"``, training). Evaluations take ``unreadable="error"``: the image is
    an error naming it, since a replaced image would be counted twice and the numbers would be of another image
    set. ``unreadable="exclude"`` (the k-NN of a pretraining run, which must not stop hours of training, and whose
    processes must stay in step) returns a blank image with label :data:`UNREADABLE`, which the k-NN leaves out.
    """

    def __init__(self, root, transform=None, class_list=None, bad_image_log=None, lazy: bool = False,
                 unreadable: str = "replace"):
        root = Path(root)
        if not root.exists():
            raise SyncoError(f"Image folder {str(root)!r} does not exist. Check the path; it must contain "
                             f"one sub-folder of images per class (root/<class>/<image>).")
        if not root.is_dir():
            raise SyncoError(f"Image folder {str(root)!r} is a file, not a directory. Point it at a directory "
                             f"containing one sub-folder of images per class (root/<class>/<image>).")
        self.class_list = None if class_list is None else list(dict.fromkeys(class_list))
        self.bad_image_log = None if bad_image_log is None else Path(bad_image_log)
        if unreadable not in UNREADABLE_MODES:
            raise ValueError(f"unreadable={unreadable!r}: one of {UNREADABLE_MODES}")
        self.unreadable = unreadable
        # allow_empty so that we, not torchvision, report which class folder is empty.
        super().__init__(str(root), transform=transform, loader=open_image if lazy else load_rgb, allow_empty=True)
        counts = dict.fromkeys(range(len(self.classes)), 0)
        for t in self.targets:
            counts[t] += 1
        empty = [self.classes[c] for c, n in counts.items() if n == 0]
        if empty:
            raise SyncoError(f"Class folder(s) {_preview(empty)} in {str(root)!r} contain no images "
                             f"(extensions: {', '.join(self.extensions or ())}). Add images, remove the "
                             f"folder, or leave the class out of the class list.")

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's listing (each class folder walked, symbolic links followed, sorted), except that every
        real folder is entered once (:func:`walk_once`): a link loop would list the same images dozens of times."""
        from torchvision.datasets.folder import has_file_allowed_extension

        def valid(path: str) -> bool:
            return is_valid_file(path) if is_valid_file is not None else has_file_allowed_extension(path, extensions)

        instances = []
        for target_class in sorted(class_to_idx):
            target_dir = os.path.join(directory, target_class)
            if not os.path.isdir(target_dir):
                continue
            for root, fnames in sorted(walk_once(target_dir)):
                instances += [(os.path.join(root, f), class_to_idx[target_class]) for f in sorted(fnames)
                              if valid(os.path.join(root, f))]
        return instances

    def find_classes(self, directory):
        # Hidden folders (.ipynb_checkpoints, .cache) are never classes.
        present = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if self.class_list is None:
            classes = present
            if not classes:
                raise SyncoError(f"Image folder {directory!r} has no class sub-folders. Expected the layout "
                                 f"root/<class>/<image>, one sub-folder per class.")
        else:
            classes = sorted(self.class_list)
            missing = sorted(set(classes) - set(present))
            if missing:
                raise SyncoError(f"{len(missing)} of the {len(classes)} requested classes are missing from "
                                 f"{directory!r}: {_preview(missing)}. Check that root points at the right split "
                                 f"folder, or use a class list that matches the folders present.")
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index: int):
        return self.sample(index, self.transform)

    def sample(self, index: int, transform=None):
        """``(transform(image), target)`` of sample ``index``; an image that cannot be opened or decoded (the loader
        or the transform raises :class:`UnreadableImage`) is recorded and the next one is taken instead."""
        for attempt in range(MAX_SKIPS):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                sample = self.loader(path)
            except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
                self._record_bad(path, exc)
                if self.unreadable == "exclude":
                    return self._excluded(transform)
                continue
            try:
                sample = transform(sample) if transform is not None else sample
            except UnreadableImage as exc:  # pixels that fail to decode behind a valid header (lazy loading)
                self._record_bad(path, exc.__cause__ or exc)
                if self.unreadable == "exclude":
                    return self._excluded(transform)
                continue
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise SyncoError(f"{MAX_SKIPS} consecutive images starting at index {index} in {self.root!r} could not "
                         f"be read. The dataset is probably damaged or not images at all; check the files "
                         f"(bad paths are listed in the 'synco.data' warnings and in the bad-image log).")

    @staticmethod
    def _excluded(transform):
        """A blank image in the sample's place (so the batch keeps its shape), labelled to be left out."""
        blank = Image.new("RGB", (8, 8))
        return (transform(blank) if transform is not None else blank), UNREADABLE

    def _record_bad(self, path: str, exc: Exception) -> None:
        if self.unreadable == "error":
            raise unreadable_eval_image(path, exc)
        logger.warning("skipping unreadable image %s (%s: %s)", path, type(exc).__name__, exc)
        if self.bad_image_log is not None:
            self.bad_image_log.parent.mkdir(parents=True, exist_ok=True)
            # Append per write: DataLoader workers are separate processes sharing this file.
            with open(self.bad_image_log, "a") as f:
                f.write(f"{path}\n")
