"""Per-step metrics to ``metrics.jsonl`` and TensorBoard (main process only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: Optional[int] = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop records a killed run wrote after its last checkpoint: they will be written again.
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
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
