"""The trainer's checkpoint: what it holds and how it is written and read.

A checkpoint holds the model (online, target, queues), the optimizer, the position in the run (optimizer step,
epoch, micro-batches of the epoch already consumed), the config, the process layout, the RNG states and the
throughput of every training segment. It is written atomically (temp file in the same folder, fsync, rename:
a kill at any moment leaves the previous complete checkpoint or the new one) and read with
``torch.load(weights_only=True)``, so the RNG states are stored as plain tensors and tuples.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import SyncoError
from ..io import atomic_save, load_torch_file

VERSION = 1


def save_training_state(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        epoch: int, batch_in_epoch: int, config: dict, world_size: int, global_batch: int,
                        segments: list[dict]) -> None:
    atomic_save(training_state(model=model, optimizer=optimizer, step=step, epoch=epoch,
                               batch_in_epoch=batch_in_epoch, config=config, world_size=world_size,
                               global_batch=global_batch, segments=segments), path)


def training_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: int,
                   batch_in_epoch: int, config: dict, world_size: int, global_batch: int,
                   segments: list[dict]) -> dict:
    """What a checkpoint holds (its tensors are the live ones: copy them before training goes on)."""
    return {
        "version": VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "config": config,
        "world_size": world_size,
        "global_batch": global_batch,
        "rng": rng_state(),
        "segments": segments,
    }


def host_copy(obj):
    """``obj`` with every tensor copied to host memory (containers rebuilt, everything else shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread: the loop (and the other ranks, which wait for rank 0 at the next
    collective) stall only while the state is copied to host memory, not while it is serialised and fsynced (about
    0.4 GB for DeiT-S). One write at a time: a save first waits for the previous one. :meth:`wait` returns once the
    last one is on disk and re-raises its error (a full disk, ...), so a run never ends believing it was saved."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def save(self, state: dict, path: Path) -> None:
        self.wait()
        snapshot = host_copy(state)
        thread = threading.Thread(target=self._write, args=(snapshot, Path(path)), name="synco-checkpoint",
                                  daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread" (a process or thread limit reached): write it here
            atomic_save(snapshot, path)
            return
        self._thread = thread

    def _write(self, snapshot: dict, path: Path) -> None:
        try:
            atomic_save(snapshot, path)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# What a training checkpoint must hold, by type: a file with anything else is refused in one paragraph before a
# value reaches the trainer (a string step would fail deep inside it with a TypeError).
STATE_TYPES = {"model": dict, "optimizer": dict, "step": int, "epoch": int, "batch_in_epoch": int, "config": dict,
               "world_size": int, "global_batch": int, "rng": dict}


def load_training_state(path: Path) -> dict:
    """The dict :func:`save_training_state` wrote (a one-paragraph SyncoError if the file is not one)."""
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise SyncoError(f"'{path}' is not a synco training checkpoint (it holds a {type(state).__name__}).")
    wrong = [f"{k} ({type(state.get(k)).__name__})" for k, t in STATE_TYPES.items()
             if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    wrong += [f"{k} ({state[k]})" for k in ("step", "epoch", "batch_in_epoch", "world_size", "global_batch")
              if isinstance(state.get(k), int) and state[k] < (1 if k in ("world_size", "global_batch") else 0)]
    if not isinstance(state.get("segments", []), list):
        wrong.append(f"segments ({type(state['segments']).__name__})")
    if wrong:
        raise SyncoError(f"'{path}' is damaged or not a synco training checkpoint: {', '.join(wrong)} missing or "
                         "not what a checkpoint holds. Move it away to start the run over, or resume from a copy "
                         "of an earlier checkpoint.")
    return state


def rng_state() -> dict:
    """RNG states as plain tensors/tuples so ``torch.load(weights_only=True)`` can read them back."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Throughput:
    """Images and seconds of every training segment: a run split by resumes has one segment per process
    that trained. Stored in the checkpoint (``segments``) so that the summary covers the whole run, not
    only its last segment. An optimizer step is ``effective_batch`` images."""

    def __init__(self, effective_batch: int):
        self.effective_batch = int(effective_batch)
        self.history: list[dict] = []
        self.start_step: Optional[int] = None
        self.t0 = 0.0
        self.excluded = 0.0
        self._last: Optional[dict] = None

    def load(self, segments) -> None:
        self.history = [dict(s) for s in segments or [] if isinstance(s, dict)]

    def start(self, step: int) -> None:
        self.start_step, self.t0, self.excluded, self._last = int(step), time.perf_counter(), 0.0, None

    def exclude(self, seconds: float) -> None:
        """Time spent on something else than training (e.g. an evaluation between epochs)."""
        self.excluded += seconds

    def seconds(self) -> float:
        """Training seconds of this segment so far (the run's one training clock: excluded time left out)."""
        return time.perf_counter() - self.t0 - self.excluded

    def segments(self, step: int) -> list[dict]:
        """Previous segments plus the current one up to ``step`` (omitted when it trained no step). Asked
        again for the same step (the run's end, right after its last checkpoint) it gives the same answer,
        so summary.json and the checkpoint agree."""
        out = [dict(s) for s in self.history]
        if self.start_step is not None and step > self.start_step:
            if self._last is None or self._last["end_step"] != step:
                seconds = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
                images = (step - self.start_step) * self.effective_batch
                self._last = {"start_step": self.start_step, "end_step": int(step), "images": images,
                              "seconds": seconds, "images_per_second": images / seconds}
            out.append(dict(self._last))
        return out


def throughput_totals(segments: list[dict]) -> dict:
    """``images_per_second`` and ``train_seconds`` over all segments, and the segments themselves."""
    images = sum(int(s.get("images", 0)) for s in segments)
    seconds = sum(float(s.get("seconds", 0.0)) for s in segments)
    return {"images_per_second": images / seconds if seconds > 0 else 0.0, "train_seconds": seconds,
            "train_images": images, "train_segments": segments}
