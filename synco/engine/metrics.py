"""Per-step metrics to ``metrics.jsonl`` and TensorBoard (main process only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def trim_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of a JSONL log that a killed run wrote after its last saved state (``step`` above
    ``last_step``): the resumed run writes them again, and each step must appear once."""
    path = Path(path)
    if not path.exists():
        return
    from ..io import atomic_write_text

    # The lines read_jsonl reads (torn or garbage ones dropped), and of those the ones with a usable step.
    keep = [line for line, rec in _records(path)
            if isinstance(rec.get("step", 0), (int, float)) and not isinstance(rec.get("step", 0), bool)
            and rec.get("step", 0) <= last_step]
    atomic_write_text("".join(line + "\n" for line in keep), path)


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: Optional[int] = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            trim_jsonl(self.path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"pretrain/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# The cosines' names in logs written by earlier synco versions (``sim_pos``, while summary.json said ``pos_cos``),
# read under today's names, so old runs resume, plot and aggregate as new ones do.
_OLD_NAMES = {"sim_pos": "pos_cos", "sim_hardest_neg": "hardest_neg_cos", "sim_synthetic": "synthetic_cos"}


def _current_names(rec: dict) -> dict:
    if not any(k.startswith("sim_") for k in rec):
        return rec
    return {_OLD_NAMES.get(k, "synthetic_cos_" + k[8:] if k.startswith("sim_syn_") else k): v for k, v in rec.items()}


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log; a line that is not a JSON object (torn by a killed writer) is skipped."""
    return [rec for _, rec in _records(path)]


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every line of a JSONL log that is a JSON object: the one reader of these logs."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append((line, _current_names(rec)))
    return records


# Hard-negative diagnostics summary.json keeps from the last training record (metrics.jsonl has them all along).
DIAGNOSTICS = ("frac_queue_above_pos", "frac_negatives_above_pos", "negatives_above_pos", "same_class_above_pos",
               "same_class_in_queue", "hcl_clamped", "hcl_top_weight", "fnc_flagged", "fnc_precision")
# The numbers training_summary can write (chance_loss is null for a method without negatives).
TRAINING_NUMBERS = ("initial_loss", "final_loss", "chance_loss", "pos_cos", "hardest_neg_cos", *DIAGNOSTICS)


def training_summary(records: list[dict], chance_loss: Optional[float]) -> dict:
    """What the logged training records say about learning: the loss first and last (next to the loss of a
    model that cannot tell the positive from the negatives), the last cosines, and the k-NN monitor's curve."""
    steps = [r for r in records if "loss" in r]
    out: dict = {}
    if steps:
        first, last = steps[0], steps[-1]
        out = {"initial_loss": first["loss"], "final_loss": last["loss"], "chance_loss": chance_loss}
        for key in ("pos_cos", "hardest_neg_cos", *DIAGNOSTICS):
            if key in last:
                out[key] = last[key]
    curve = [[r["epoch"] + 1, r["knn_top1"]] for r in records if "knn_top1" in r]
    if curve:
        out["knn_curve"] = curve  # [epochs done, k-NN top-1]
    return out
