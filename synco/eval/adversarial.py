"""`synco eval adversarial`: natural adversarial robustness of backbone + frozen linear head (Table 14).

Attacks come from torchattacks (pinned to 3.3.0) with the paper's settings (section 8.3), all untargeted:

=========== ==========================================================================================
fgsm        FGSM, L-inf eps 8/255
pgd         PGD, L-inf eps 8/255, step 2/255, 10 iterations, random start
cw          C&W L2, kappa 0, 50 steps, lr 0.01, c 1e-4
square      Square, L-inf eps 8/255, 1000 queries
autoattack  AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square), L-inf eps 8/255; the targeted parts use
            the 9 most likely other classes as in the reference AutoAttack (torchattacks would try all)
tifgsm      TI-FGSM, L-inf eps 8/255, step 2/255, 10 steps
onepixel    OnePixel, 1 pixel, 10 differential-evolution steps
=========== ==========================================================================================

Attacks see images in [0, 1]: the evaluation transform is the usual centre crop without normalisation, and
the ImageNet mean/std normalisation is the first layer of the attacked model (:class:`NormalizedClassifier`),
so eps is measured in pixel units. Top-1 (%) on the adversarial images is reported next to clean top-1, with
the largest L-inf and mean L2 perturbation each attack actually used.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..device import resolve_device
from ..engine import dist
from ..errors import SyncoError
from ..options import opt
from .classes import head_labels
from .common import CROP_RATIO, EvalOptions, create_eval_set, eval_split_and_crop
from .head import load_classifier
from .results import markdown_table, save_result
from .views import BenchmarkView, center_crop_ops, subset_indices

EPS = 8 / 255
ALPHA = 2 / 255


def _fgsm(model, n_classes, seed):
    import torchattacks

    return torchattacks.FGSM(model, eps=EPS)


def _pgd(model, n_classes, seed):
    import torchattacks

    return torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=10, random_start=True)


def _cw(model, n_classes, seed):
    import torchattacks

    return torchattacks.CW(model, c=1e-4, kappa=0, steps=50, lr=0.01)


def _square(model, n_classes, seed):
    import torchattacks

    return torchattacks.Square(model, norm="Linf", eps=EPS, n_queries=1000, n_restarts=1, seed=seed)


def _autoattack(model, n_classes, seed):
    import torchattacks

    if n_classes < 2:
        raise SyncoError("AutoAttack needs at least 2 classes.")
    atk = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=n_classes, seed=seed)
    for sub in atk._autoattack.attacks:  # APGD-T / FAB-T: the top-9 other classes, as in Croce & Hein
        if hasattr(sub, "n_target_classes"):
            sub.n_target_classes = min(9, n_classes - 1)
    return atk


def _tifgsm(model, n_classes, seed):
    import torchattacks

    return torchattacks.TIFGSM(model, eps=EPS, alpha=ALPHA, steps=10)


def _onepixel(model, n_classes, seed):
    import torchattacks

    return torchattacks.OnePixel(model, pixels=1, steps=10)


# name -> (Table 14 column, threat model, factory(model, n_classes, seed))
ATTACKS: dict[str, tuple[str, str, Callable]] = {
    "fgsm": ("FGSM", "Linf 8/255", _fgsm),
    "pgd": ("PGD", "Linf 8/255", _pgd),
    "cw": ("C&W", "L2", _cw),
    "square": ("Square", "Linf 8/255", _square),
    "autoattack": ("Auto", "Linf 8/255", _autoattack),
    "tifgsm": ("TIFGSM", "Linf 8/255", _tifgsm),
    "onepixel": ("OnePixel", "L0 1 pixel", _onepixel),
}


@dataclass
class AdversarialOptions(EvalOptions):
    attacks: list[str] = opt(factory=lambda: list(ATTACKS), nonempty=True)  # names (and aliases): parse_attacks
    # a fixed random subset (seed) of the validation set
    max_images: Optional[int] = opt(None, ge=1, why="or null for all")
    crop_ratio: Optional[float] = opt(None, **CROP_RATIO)  # default 224/256 (1.0 for digits)


class NormalizedClassifier(nn.Module):
    """[0, 1] images -> Normalize(mean, std) -> model: what the attacks differentiate through."""

    def __init__(self, model: nn.Module, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def parse_attacks(value) -> list[str]:
    names = [a.strip().lower() for a in (value.split(",") if isinstance(value, str) else value) if str(a).strip()]
    names = ["autoattack" if n in ("auto", "aa") else "cw" if n in ("c&w", "cwl2") else n for n in names]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise SyncoError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}.")
    if not names:
        raise SyncoError(f"no attack selected; choose from {', '.join(ATTACKS)}.")
    return list(dict.fromkeys(names))


def create_attack(name: str, model: nn.Module, n_classes: int, seed: int = 0):
    """The torchattacks object for ``name`` with the paper's parameters."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        raise SyncoError("adversarial evaluation needs torchattacks: pip install 'synco-ssl[robustness]' "
                         "(torchattacks==3.3.0).") from None
    return ATTACKS[parse_attacks([name])[0]][2](model, n_classes, seed)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def attack_accuracy(model: nn.Module, loader: DataLoader, attacks: Sequence[str], n_classes: int,
                    device: torch.device, seed: int = 0, progress: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Clean and per-attack top-1 (%) of ``model`` (taking [0, 1] images) over ``loader``."""
    model.eval()
    out: dict = {}
    correct, n = 0, 0
    for x, y in loader:
        correct += int((_predict(model, x.to(device)) == torch.as_tensor(y).to(device)).sum())
        n += len(y)
    out["clean"] = {"top1": 100.0 * correct / max(n, 1), "n": n}
    log(f"clean: top-1 {out['clean']['top1']:.2f}% on {n} images")
    for name in attacks:
        torch.manual_seed(seed)
        atk = create_attack(name, model, n_classes, seed)
        correct, n, linf, l2_sum = 0, 0, 0.0, 0.0
        t0 = time.perf_counter()
        for x, y in tqdm(loader, desc=name, disable=not progress or not dist.is_main(), leave=False):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            with warnings.catch_warnings():  # OnePixel's differential evolution divides by a zero spread
                warnings.filterwarnings("ignore", category=RuntimeWarning, module="torchattacks")
                adv = atk(x, y).detach()
            delta = (adv - x).flatten(1)
            linf = max(linf, float(delta.abs().max()) if delta.numel() else 0.0)
            l2_sum += float(delta.norm(dim=1).sum())
            correct += int((_predict(model, adv) == y).sum())
            n += len(y)
        column, threat, _ = ATTACKS[name]
        out[name] = {"top1": 100.0 * correct / max(n, 1), "n": n, "max_linf": linf, "mean_l2": l2_sum / max(n, 1),
                     "threat": threat, "seconds": time.perf_counter() - t0}
        log(f"{column}: top-1 {out[name]['top1']:.2f}% (max L-inf {linf * 255:.2f}/255, "
            f"mean L2 {out[name]['mean_l2']:.3f}, {out[name]['seconds']:.1f}s)")
    return out


def table14_row(results: dict) -> dict:
    row = {"Clean": results["clean"]["top1"]}
    for name, (column, _, _) in ATTACKS.items():
        row[column] = results[name]["top1"] if name in results else None
    return row


def adversarial_tables(result: dict) -> str:
    res = result["results"]
    rows = [{"attack": "clean", "threat": "", "top-1 (%)": res["clean"]["top1"], "images": res["clean"]["n"]}]
    for name, (column, threat, _) in ATTACKS.items():
        if name in res:
            r = res[name]
            rows.append({"attack": column, "threat": threat, "top-1 (%)": r["top1"], "images": r["n"],
                         "max L-inf (x255)": r["max_linf"] * 255, "mean L2": r["mean_l2"], "seconds": r["seconds"]})
    cols = ["attack", "threat", "top-1 (%)", "images", "max L-inf (x255)", "mean L2", "seconds"]
    row = {k: ("—" if v is None else v) for k, v in result["table14"].items()}
    return markdown_table(rows, cols) + "\n\nTable 14 row:\n" + markdown_table([row], list(row))


def run_adversarial(checkpoint: str, head_path: str, out: Path, opts: AdversarialOptions,
                    progress: bool = True) -> dict:
    attacks = parse_attacks(opts.attacks)
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    classifier, classes, size, meta, _ = load_classifier(checkpoint, head_path, opts, device)
    model = NormalizedClassifier(classifier).to(device).eval()
    base = create_eval_set(opts, size)
    labels, missing = head_labels(list(base.classes), classes)
    if missing:
        raise SyncoError(f"the evaluation set's classes ({', '.join(missing[:4])}, ...) are not classes of the "
                         "linear head: was the head trained on another dataset?")
    crop_ratio = opts.crop_ratio or eval_split_and_crop(opts.dataset)[1]
    view = BenchmarkView(base, subset_indices(len(base), opts.max_images, opts.seed),
                         center_crop_ops(size, crop_ratio), labels=labels, normalize=False)
    loader = DataLoader(view, batch_size=opts.batch_size, shuffle=False, num_workers=opts.num_workers)
    log = print if dist.is_main() else (lambda s: None)
    res = attack_accuracy(model, loader, attacks, len(classes), device, seed=opts.seed, progress=progress, log=log)
    result = {"protocol": "adversarial", "checkpoint": checkpoint, "linear_head": str(head_path),
              "backbone": meta["backbone"], "dataset": opts.dataset, "image_size": size, "results": res,
              "table14": table14_row(res), "torchattacks": _torchattacks_version(), "options": asdict(opts)}
    if dist.is_main():
        save_result(out, "adversarial", result)
        print(adversarial_tables(result))
    return result


def _torchattacks_version() -> Optional[str]:
    try:
        import torchattacks

        return torchattacks.__version__
    except ImportError:  # pragma: no cover
        return None
