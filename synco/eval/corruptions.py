"""ImageNet-C corruptions and the ImageNet-W watermark, made on the fly, and the ImageNet-C summary.

Both effects act on a centre-cropped uint8 CHW tensor (see :class:`synco.eval.views.BenchmarkView`) and
are seeded per image, so a generated benchmark is the same in every run and every DataLoader worker.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import SyncoError

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


def check_corruptions(names: Sequence[str], severities: Sequence[int]) -> None:
    unknown = [n for n in names if n not in FAMILY_OF]
    if unknown:
        raise SyncoError(f"unknown corruption(s) {', '.join(map(str, unknown))}; choose from the 15 ImageNet-C ones "
                         f"({', '.join(IMAGENET_C)}) or the extra {', '.join(CORRUPTION_FAMILIES['extra'])}.")
    invalid = [s for s in severities if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5]
    if invalid:
        raise SyncoError(f"severities must be integers 1..5, got {invalid}.")


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
