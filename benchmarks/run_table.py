"""Does a run learn? One Markdown row per pretraining run dir: k-NN top-1 (k=20) against the same backbone
untrained and raw pixels, the loss first and last against chance, the last positive / hardest-negative cosines,
and the training time.

    python benchmarks/run_table.py runs/sweep-methods-digits/method-synco/seed*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from synco.config import load_config
from synco.engine.metrics import read_jsonl, training_summary
from synco.pretrain import chance_loss_at_end


def row(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    cfg = load_config(str(run / "config.yaml"))
    t = training_summary(read_jsonl(run / "metrics.jsonl"), chance_loss_at_end(cfg))
    chance = f"{t['chance_loss']:.2f}" if t.get("chance_loss") else "—"
    frac = t.get("frac_negatives_above_pos")
    return (f"| {run} | {cfg.method} | {cfg.seed} | **{s['knn_top1']:.1f}** | {s['knn_top1_random_init']:.1f} | "
            f"{s.get('knn_top1_pixels', float('nan')):.1f} | {t['initial_loss']:.2f} → {t['final_loss']:.2f} | {chance} | "
            f"{t.get('pos_cos', float('nan')):.3f} / {t.get('hardest_neg_cos', float('nan')):.3f} | "
            f"{'—' if frac is None else f'{100 * frac:.1f} %'} | {s['train_seconds']:.0f} s |")


def main() -> None:
    print("| run | method | seed | k-NN top-1 | untrained | pixels | loss first → last | chance | pos / hardest "
          "neg cos | queue above pos | train time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))


if __name__ == "__main__":
    main()
