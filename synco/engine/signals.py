"""SIGINT / SIGTERM: say so, and during training stop at the next optimizer step with a checkpoint.

Schedulers (SLURM, Kubernetes, ...) send SIGTERM some seconds before SIGKILL. The CLI installs
:func:`handle_signals` for every command: outside a training loop a signal stops the command at once with
a one-line message (exit 128 + signal number: 130 for SIGINT, 143 for SIGTERM). Inside :func:`deferred`
(the training loop) the first signal is only recorded; the loop asks :func:`stop_requested` after each
optimizer step, writes a checkpoint and raises :func:`stopped`. A second signal stops at once.

Forked DataLoader workers inherit the handler and ignore SIGINT; torch installs its own SIGTERM handler in
them, which :func:`ignore_in_worker` (a ``worker_init_fn``) replaces. The main process shuts them down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import torch

from ..errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")


class _State:
    pid: Optional[int] = None  # the process whose handlers are installed
    defer: int = 0  # > 0 inside a training loop
    pending: Optional[int] = None  # the signal received while deferring


_S = _State()


def _handler(signum, frame) -> None:
    if os.getpid() != _S.pid:
        return  # a forked DataLoader worker: the main process stops it
    if _S.defer and _S.pending is None:
        _S.pending = signum
        # os.write, not print: a handler may interrupt a print in progress (reentrant buffered write).
        os.write(2, (f"\nsynco: {signal_name(signum)} received: stopping after the current step, with a "
                     "checkpoint (send it again to stop at once).\n").encode())
        return
    what = "stopped at once" if _S.pending is not None else "stopped"
    raise Interrupted(f"{signal_name(signum)} received: {what}. Nothing half-written is left behind; a "
                      "pretraining run resumes from its last checkpoint when the same command is re-run.", signum)


@contextlib.contextmanager
def handle_signals():
    """Install the SIGINT/SIGTERM handlers for the duration of a command (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    saved = (_S.pid, _S.defer, _S.pending)
    _S.pid, _S.defer, _S.pending = os.getpid(), 0, None
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _S.pid, _S.defer, _S.pending = saved


@contextlib.contextmanager
def deferred(on_exit_message: str = "training had finished; re-run the same command to finish the rest"):
    """Record signals instead of raising them; the code inside polls :func:`stop_requested`. A signal still
    pending when the block ends (it arrived after the last check) stops the command then."""
    _S.defer += 1
    try:
        yield
    finally:
        _S.defer -= 1
    if _S.pid == os.getpid() and _S.pending is not None and not _S.defer:
        signum, _S.pending = _S.pending, None
        raise Interrupted(f"{signal_name(signum)} received: stopped; {on_exit_message}.", signum)


def stop_requested(step: int, world: int = 1, device=None, every: int = 1) -> Optional[int]:
    """The pending signal's number, or None. With several processes the ranks agree through an all-reduce
    every ``every`` steps (all ranks call it at the same steps), so they all stop at the same step."""
    if world <= 1:
        return _S.pending
    if step % max(1, every):
        return None
    flag = torch.tensor([_S.pending or 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) or None


def stopped(signum: int, step: int, epoch: int, checkpoint: Path) -> Interrupted:
    """The error to raise once the checkpoint of ``step`` is written."""
    _S.pending = None
    return Interrupted(f"{signal_name(signum)} received: stopped after step {step} (epoch {epoch}) with a "
                       f"checkpoint in {checkpoint}; re-run the same command to resume from it.", signum)


def ignore_in_worker(worker_id: Optional[int] = None) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM, which the main process handles (it
    stops them when it stops). Otherwise torch's own SIGTERM handler kills a worker when a scheduler signals
    the whole process group, and the main process fails mid-step instead of writing its checkpoint."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def release_workers(timeout: float = 10.0) -> None:
    """After a command failed: stop the DataLoader workers it left running. They ignore SIGTERM
    (:func:`ignore_in_worker`), and multiprocessing's exit handler terminates daemonic children with SIGTERM and then
    joins them, so the process would never exit. Each loader iterator still alive (kept by the error's traceback)
    tells its workers to finish through their queues, as an exhausted one does (torch's own shutdown: killing the
    workers instead breaks the queues' feeder threads, which print tracebacks); a worker left after that is killed."""
    import gc
    import multiprocessing

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    if not any(p.daemon for p in multiprocessing.active_children()):
        return
    for iterator in [o for o in gc.get_objects() if type(o) is _MultiProcessingDataLoaderIter]:
        iterator._shutdown_workers()
    left = [p for p in multiprocessing.active_children() if p.daemon]
    for p in left:
        p.kill()
    for p in left:
        p.join(timeout)


def simulate(signum: int = signal.SIGTERM) -> None:
    """Record a signal as if it had been received (tests)."""
    _S.pending = signum
