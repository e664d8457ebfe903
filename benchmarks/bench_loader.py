"""Can the pretraining loader feed a GPU? Images per second per worker core at 224 px, for both view paths.

    python benchmarks/bench_loader.py                       # builds the JPEG folder, 1 thread, JSON on stdout
    python benchmarks/bench_loader.py --rounds 7 --images 96 --json out.json

The folder: an ImageNet-like ``root/train/<class>/*.JPEG`` of about 500 x 375 JPEGs (quality 90, landscape and
portrait) cut from the photos that ship with scikit-image and scikit-learn, so no download is needed.

What one DataLoader worker does per image, timed in this process with one torch thread (a worker runs with one):

- ``workers``: ``data.augment.on=workers``: decode, then both BYOL views of Table 11 made per image on the CPU;
  the unit is image pairs per second (the GPU presets' views, blur p = 1.0 on view 1);
- ``device``: ``data.augment.on=device``: the worker side only (decode, then each view's crop cut from the full
  image and resized to 224 px, uint8); flips, colour, blur and solarisation run batched on the GPU.

Each round fetches ``--images`` items of each path in turn (so load changes on a shared machine hit both alike);
the figure is the median over rounds, with the bytes one batch of ``--batch`` items takes out of the workers.
The cores-per-GPU table divides a GPU's training rate by the per-core rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:
    import synco  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synco.config import load_config
from synco.engine.data import PretrainData, pretrain_data_kwargs
from synco.engine.dist import DistInfo

GPU_RATES = (500, 1000, 1500)  # img/s per GPU: DeiT-S SynCo on an A100 .. H100 (issue 19)


def _photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle_left",
             "motorcycle_right", "retina", "skin", "cat", "colorwheel", "logo", "page", "camera", "brick", "grass",
             "gravel", "moon", "text", "clock", "coins", "horse", "checkerboard", "microaneurysms", "eagle",
             "lily", "kidney", "cell"]
    out = list(load_sample_images().images)
    for name in names:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a photo missing from this scikit-image version, or one needing pooch
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        if img.ndim == 3 and img.shape[-1] in (3, 4) and min(img.shape[:2]) >= 128:
            out.append(img[..., :3].astype(np.uint8) if img.dtype == np.uint8 else
                       (255 * (img[..., :3] / max(float(img.max()), 1e-9))).astype(np.uint8))
    return out


def make_folder(root: Path, n: int = 128, seed: int = 0) -> Path:
    """``n`` JPEGs of about 500 x 375 (a quarter portrait), quality 90, in one class folder per photo."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    for i in range(n):
        k = i % len(photos)
        img = Image.fromarray(photos[k])
        size = (375, 500) if rng.random() < 0.25 else (500, 375)
        scale = max(size[0] / img.width, size[1] / img.height) * rng.uniform(1.0, 1.3)
        img = img.resize((max(size[0], round(img.width * scale)), max(size[1], round(img.height * scale))),
                         Image.BICUBIC)
        x, y = rng.integers(0, img.width - size[0] + 1), rng.integers(0, img.height - size[1] + 1)
        out = root / "train" / f"c{k:02d}"
        out.mkdir(parents=True, exist_ok=True)
        img.crop((x, y, x + size[0], y + size[1])).save(out / f"{i:05d}.JPEG", quality=90)
    return root


def dataset(root: Path, on: str):
    cfg = load_config("synco-imagenet-deit-s", [f"data.root={root}", "device=cpu", f"data.augment.on={on}",
                                                "data.num_workers=0"])
    return PretrainData(**pretrain_data_kwargs(cfg, DistInfo())).dataset


def item_bytes(item) -> int:
    if isinstance(item, torch.Tensor):
        return item.numel() * item.element_size()
    if isinstance(item, (tuple, list)):
        return sum(item_bytes(x) for x in item)
    return 0


def fetch_rate(ds, n: int, epoch: int, batch: int) -> float:
    """Items per second as a DataLoader worker fetches them: a batch of keys at a time (``__getitems__``, where the
    dataset has it), else one by one."""
    keys = [(epoch, i % len(ds)) for i in range(n)]
    many = getattr(ds, "__getitems__", None)
    start = time.perf_counter()
    for k in range(0, n, batch):
        if many is not None:
            many(keys[k:k + batch])
        else:
            for key in keys[k:k + batch]:
                ds[key]
    return n / (time.perf_counter() - start)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="an existing folder (default: build one in a temp dir)")
    ap.add_argument("--files", type=int, default=128, help="JPEGs in the built folder")
    ap.add_argument("--images", type=int, default=96, help="items per path per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128, help="batch whose size out of the workers is reported")
    ap.add_argument("--fetch", type=int, default=32, help="keys per fetch (a worker is handed a batch at a time)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or make_folder(Path(tmp) / "jpegs", args.files)
        paths = {on: dataset(root, on) for on in ("workers", "device")}
        for ds in paths.values():
            fetch_rate(ds, 4, 0, 4)  # first-call costs (imports, tables) out of the timing
        rates = {on: [] for on in paths}
        for r in range(args.rounds):
            for on, ds in paths.items():
                rates[on].append(fetch_rate(ds, args.images, r + 1, args.fetch))
        sizes = [Image.open(p).size for p, _ in paths["workers"].dataset.samples]
        result = {"folder": str(root), "files": len(sizes), "median_size": [statistics.median(s[i] for s in sizes)
                                                                           for i in (0, 1)],
                  "threads": torch.get_num_threads(), "rounds": args.rounds, "images_per_round": args.images}
        for on, ds in paths.items():
            per_core = statistics.median(rates[on])
            result[on] = {"per_core_per_second": per_core, "rounds": rates[on],
                          "unit": "image pairs" if on == "workers" else "images",
                          "batch_bytes_out_of_workers": item_bytes(ds[(0, 0)][0]) * args.batch,
                          "cores_per_gpu": {str(g): g / per_core for g in GPU_RATES}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
