"""Where do a trained run's hard negatives come from? (issue 10: the positive's cosine stays below the hardest
queue negative's on digits.)

Replays two more epochs of a finished pretraining run (the first fills the queue, the second is measured, its
start included) exactly as training sees it (same views, same sampler, the trained online/target encoders, a
queue of the target's keys filled step by step) and records, for every query, which image and which class each
queue entry came from. Reports:

* own_key: the share of queries whose own image has a key in the queue (the "own earlier key" hypothesis);
* same_class_hard: the share of each query's n_hard hardest queue entries that show the same digit (chance: ~10%);
* same_class_above_pos: of the queue entries more similar than the positive, the share of the same digit;
* pos vs hardest: the positive's cosine against the hardest queue entry of any class, and of another class only.

  python benchmarks/hard_negative_origin.py runs/sweep-methods-digits/method-synco/seed0 [more run dirs] \
      [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synco.config import load_config  # noqa: E402
from synco.engine.data import create_pretrain_data  # noqa: E402
from synco.engine.dist import DistInfo  # noqa: E402
from synco.io import load_torch_file  # noqa: E402
from synco.methods import method_spec  # noqa: E402
from synco.models.method import create_model  # noqa: E402


@torch.no_grad()
def replay(run_dir: Path, steps: int = 0) -> dict:
    cfg = load_config(str(run_dir / "config.yaml"), ["data.num_workers=0"])
    if cfg.data.augment.on != "device" or cfg.optim.accum_steps != 1 or not method_spec(cfg).uses_queue:
        raise SystemExit(f"{run_dir}: the replay needs data.augment.on=device (batches carry their dataset index), "
                         "optim.accum_steps=1 and a queue (synco or moby).")
    state = load_torch_file(run_dir / "checkpoint.pt")
    torch.manual_seed(0)
    model = create_model(cfg)
    model.load_state_dict(state["model"])
    model.train()  # batch statistics, as in training
    data = create_pretrain_data(cfg, DistInfo())
    size, n_hard = cfg.contrast.queue_size, cfg.negatives.n_hard
    q_img = torch.full((size,), -1, dtype=torch.long)
    q_cls = torch.full((size,), -1, dtype=torch.long)
    queue = None
    ptr = 0
    totals = {"queries": 0, "own_key": 0, "same_class_hard": 0.0, "above_pos": 0, "same_class_above_pos": 0,
              "own_above_pos": 0, "pos": 0.0, "hardest": 0.0, "hardest_other_class": 0.0, "pos_beats_hardest": 0,
              "pos_beats_hardest_other_class": 0}
    # Two more epochs: the first fills the queue, the second is measured, its start included (where the queue
    # still holds keys of the previous epoch's last steps, the only time a query can meet its own earlier key).
    batches = [(e, b) for e in (cfg.epochs, cfg.epochs + 1) for b in data.loader(e)]
    measured = [e == cfg.epochs + 1 for e, _ in batches]
    if steps:
        first = measured.index(True)
        measured = [m and i < first + steps for i, m in enumerate(measured)]
    for (epoch, ((images, index), labels)), measure in zip(batches, measured):
        x1, x2 = data.views((images, index), epoch, torch.device("cpu"))
        q1, q2 = (F.normalize(q.float(), dim=1) for q in model.online(x1, x2))
        k1, k2 = (F.normalize(k.float(), dim=1) for k in model.target(x1, x2))
        if measure:
            for q, k, other in ((q1, k2, queue[1]), (q2, k1, queue[0])):
                pos = (q * k).sum(1)
                sims = q @ other.t()  # [B, K]
                same = labels[:, None] == q_cls[None, :]
                own = index[:, None] == q_img[None, :]
                hard = sims.topk(min(n_hard, size), dim=1).indices
                above = sims > pos[:, None]
                other_class = sims.masked_fill(same, -2.0)
                totals["queries"] += len(q)
                totals["own_key"] += int(own.any(1).sum())
                totals["same_class_hard"] += float(same.gather(1, hard).float().mean(1).sum())
                totals["above_pos"] += int(above.sum())
                totals["same_class_above_pos"] += int((above & same).sum())
                totals["own_above_pos"] += int((above & own).sum())
                totals["pos"] += float(pos.sum())
                totals["hardest"] += float(sims.max(1).values.sum())
                totals["hardest_other_class"] += float(other_class.max(1).values.sum())
                totals["pos_beats_hardest"] += int((pos > sims.max(1).values).sum())
                totals["pos_beats_hardest_other_class"] += int((pos > other_class.max(1).values).sum())
        if queue is None:
            queue = torch.zeros(2, size, k1.shape[1])  # [view, K, C]
        idx = (ptr + torch.arange(len(k1))) % size
        queue[0, idx], queue[1, idx] = k1, k2
        q_img[idx], q_cls[idx] = index, labels
        ptr = (ptr + len(k1)) % size
    n = max(totals["queries"], 1)
    above = max(totals["above_pos"], 1)
    return {"run": str(run_dir), "method": cfg.method, "seed": cfg.seed, "queue_size": size, "n_hard": n_hard,
            "queries": totals["queries"],
            "own_key_in_queue": totals["own_key"] / n,
            "same_class_share_of_hard_set": totals["same_class_hard"] / n,
            "negatives_above_pos_per_query": totals["above_pos"] / n,
            "same_class_share_of_negatives_above_pos": totals["same_class_above_pos"] / above,
            "own_key_share_of_negatives_above_pos": totals["own_above_pos"] / above,
            "pos_cos": totals["pos"] / n, "hardest_neg_cos": totals["hardest"] / n,
            "hardest_other_class_cos": totals["hardest_other_class"] / n,
            "pos_beats_hardest": totals["pos_beats_hardest"] / n,
            "pos_beats_hardest_other_class": totals["pos_beats_hardest_other_class"] / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=0, help="measure only this many steps (0: one whole epoch)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [replay(r, args.steps) for r in args.runs]
    keys = [k for k in rows[0] if k not in ("run", "method", "seed", "queue_size", "n_hard", "queries")]
    for r in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    if len(rows) > 1:
        print("mean ± std over runs:")
        for k in keys:
            vals = [r[k] for r in rows]
            print(f"  {k}: {statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
