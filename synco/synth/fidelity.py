"""How recognisable is a synthetic clone? A classifier trained on real images labels the synthetic ones.

Built-in case: an RBF SVM (or logistic regression) on the pixels of the real digits train split, at the
synthetic images' size, grayscale. Its accuracy on the real test split is reported next to its accuracy
on the synthetic images, per class, so "the synthetic 8s are read as 8s 91% of the time" can be compared
with how well the same classifier reads real 8s. Pixel classifiers suit digits; for natural images
(an ImageFolder given as ``real``) the numbers only flag gross failures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import SyncoError

CLASSIFIERS = ("svm", "logreg")


def _load_folder(root, size: int, classes: Optional[list[str]] = None, limit: Optional[int] = None):
    """(X [N, size*size] in [0, 1], y class names) from an ImageFolder, grayscale, resized bilinearly."""
    from ..data.folder import SafeImageFolder

    ds = SafeImageFolder(root, class_list=classes)
    xs, ys = [], []
    for path, target in ds.samples[: limit or None]:
        with Image.open(path) as im:
            g = im.convert("L")
            if g.size != (size, size):
                g = g.resize((size, size), Image.Resampling.BILINEAR)
            xs.append(np.asarray(g, dtype=np.float32).ravel() / 255.0)
        ys.append(ds.classes[target])
    return np.stack(xs), np.array(ys)


def _native_size(root) -> int:
    from ..data.folder import SafeImageFolder

    ds = SafeImageFolder(root)
    with Image.open(ds.samples[0][0]) as im:
        return max(im.size)


def _classifier(name: str, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if name == "svm":
        return SVC(C=10.0, gamma="scale")
    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, random_state=seed))
    raise SyncoError(f"unknown classifier '{name}': choose {' or '.join(CLASSIFIERS)}.")


def _per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    out = {}
    for c in classes:
        m = y_true == c
        out[c] = {"n": int(m.sum()), "accuracy": float((y_pred[m] == c).mean()) if m.any() else None}
    return out


def fidelity(synthetic, real: str = "digits", size: int = 0, classifier: str = "svm", seed: int = 0) -> dict:
    """Train ``classifier`` on real train images, score real test images and the synthetic folder.

    ``real`` is ``digits`` or a folder dataset root (``train/`` and ``val/``). ``size`` (0 = the synthetic
    images' own size) is the side length the images are compared at.
    """
    synthetic = Path(synthetic)
    size = size or _native_size(synthetic)
    if real == "digits":
        from ..data.digits import DigitsDataset

        tr, te = DigitsDataset("train", image_size=size), DigitsDataset("test", image_size=size)
        classes = list(tr.classes)
        x_tr = tr.images[..., 0].reshape(len(tr), -1).astype(np.float32) / 255.0
        x_te = te.images[..., 0].reshape(len(te), -1).astype(np.float32) / 255.0
        y_tr = np.array([classes[t] for t in tr.targets])
        y_te = np.array([classes[t] for t in te.targets])
    else:
        from ..data.build import _split_dir

        root = Path(real)
        x_tr, y_tr = _load_folder(_split_dir(root, "train"), size)
        classes = sorted(set(y_tr.tolist()))
        try:
            x_te, y_te = _load_folder(_split_dir(root, "val"), size, classes)
        except SyncoError:
            x_te, y_te = None, None
    from ..data.folder import SafeImageFolder

    present = SafeImageFolder(synthetic).classes
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise SyncoError(f"the synthetic folder '{synthetic}' has class folders the real data lacks: "
                         f"{', '.join(unknown[:5])}. Class folder names must match the real dataset's "
                         f"({', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}).")
    x_syn, y_syn = _load_folder(synthetic, size)
    clf = _classifier(classifier, seed).fit(x_tr, y_tr)
    pred_syn = clf.predict(x_syn)
    result = {
        "synthetic": str(synthetic), "real": real, "classifier": classifier, "size": size,
        "n_real_train": int(len(y_tr)), "n_synthetic": int(len(y_syn)),
        "synthetic_accuracy": float((pred_syn == y_syn).mean()),
        "per_class": {},
        "confusion": {c: {p: int(((y_syn == c) & (pred_syn == p)).sum()) for p in classes if
                          ((y_syn == c) & (pred_syn == p)).any()} for c in present},
    }
    syn_pc = _per_class(y_syn, pred_syn, present)
    real_pc = {}
    if x_te is not None:
        pred_te = clf.predict(x_te)
        result["real_test_accuracy"] = float((pred_te == y_te).mean())
        result["n_real_test"] = int(len(y_te))
        real_pc = _per_class(y_te, pred_te, present)
    for c in present:
        result["per_class"][c] = {"n_synthetic": syn_pc[c]["n"], "synthetic_accuracy": syn_pc[c]["accuracy"],
                                  "real_test_accuracy": real_pc.get(c, {}).get("accuracy")}
    return result


def to_markdown(result: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [f"## Fidelity of `{result['synthetic']}`", "",
             f"{result['classifier']} trained on {result['n_real_train']} real `{result['real']}` train images "
             f"({result['size']}x{result['size']} grayscale pixels) classifies {result['n_synthetic']} synthetic "
             "images.", "",
             "| class | synthetic images | accuracy on synthetic (%) | accuracy on real test (%) |",
             "|---|---:|---:|---:|"]
    for c, r in result["per_class"].items():
        lines.append(f"| {c} | {r['n_synthetic']} | {pct(r['synthetic_accuracy'])} | {pct(r['real_test_accuracy'])} |")
    lines.append(f"| **all** | {result['n_synthetic']} | **{pct(result['synthetic_accuracy'])}** | "
                 f"**{pct(result.get('real_test_accuracy'))}** |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out) -> tuple[Path, Path]:
    from ..io import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "fidelity.json", out / "fidelity.md"
    atomic_write_text(json.dumps(result, indent=2) + "\n", j)
    atomic_write_text(to_markdown(result), m)
    print(f"synco: fidelity report -> {j}, {m}", file=sys.stderr)
    return j, m
