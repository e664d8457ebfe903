"""Launchers: run a list of commands (one per sweep run or evaluation), each with its output in a log.

* ``local``: ``--jobs N`` concurrent subprocesses on this machine, a progress bar over the tasks.
* ``slurm``: one submitit job per task (a job array, ``executor.map_array``); ``slurm.cluster: local``
  runs the same jobs with submitit's ``LocalExecutor`` (tests, machines without SLURM).

Both run :func:`run_task`, which starts the command as a subprocess with stdout and stderr appended to
the task's log, and return each task's exit status. A failure is a status, never an exception, so the
other tasks still finish.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import SyncoError

LAUNCHERS = ("local", "slurm")
LOCKED = 75  # exit status of a task whose folder another live process is running (EX_TEMPFAIL)


@dataclass
class Task:
    name: str  # shown in the progress bar and in failure reports
    cmd: list[str]
    log: str  # stdout + stderr are appended here
    env: dict = field(default_factory=dict)  # added to the environment
    cwd: Optional[str] = None
    lock: Optional[str] = None  # a file locked (flock) for as long as the command runs


_running: set = set()
_lock = threading.Lock()
_stopping = threading.Event()  # set when the local launcher is stopping: start nothing more


def _try_lock(path: Optional[str]):
    """An open file holding an exclusive flock on ``path``; None if another process holds it. Without
    fcntl (Windows) or on a file system that refuses locks, runs unlocked (returns -1)."""
    if not path:
        return -1
    try:
        import fcntl
    except ImportError:
        return -1
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        return fd  # locking unsupported here: proceed unlocked
    return fd


def run_task(task: Task) -> int:
    """Run ``task.cmd`` with its output appended to ``task.log``; returns the exit status.

    The local launcher calls it from threads; under submitit it is the job function (it runs on the
    compute node). The child inherits the lock on ``task.lock``, so a run left going by a killed sweep
    keeps its folder locked and a new sweep does not start a second process on it (exit ``LOCKED``)."""
    log = Path(task.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in task.env.items()}}
    fd = _try_lock(task.lock)
    with open(log, "a") as f:
        if fd is None:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} synco sweep: not started, another process is "
                    f"running this run (it holds {task.lock}); an earlier sweep's run left going?\n")
            return LOCKED
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} synco sweep runs: {shlex.join(task.cmd)}\n")
        f.flush()
        try:
            try:
                # Its own session: a Ctrl-C at the terminal reaches the sweep only, which then sends each run
                # one SIGTERM (a run stops after its current step with a checkpoint; two signals stop at once).
                proc = subprocess.Popen(task.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, cwd=task.cwd, pass_fds=(fd,) if fd >= 0 else (),
                                        start_new_session=True)
            except OSError as e:
                f.write(f"cannot start: {e}\n")
                return 127
            with _lock:
                _running.add(proc)
                if _stopping.is_set():
                    proc.terminate()
            try:
                return proc.wait()
            finally:
                with _lock:
                    _running.discard(proc)
        finally:
            if fd >= 0:
                os.close(fd)


def failure_text(task: Task, rc: int) -> str:
    if rc == LOCKED:
        return f"{task.name} was not started: another process is still running it (see {task.log})"
    return f"{task.name} failed (exit {rc}); log: {task.log}"


def _stop_running(grace_s: float = 60.0) -> None:
    """SIGTERM every running task (it checkpoints and exits), then SIGKILL what is left after ``grace_s``."""
    with _lock:
        procs = list(_running)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True)


def _completed(futures):
    """Like ``as_completed``, but waking up every second so that a signal is handled at once."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
        yield from done


def run_local(tasks: list[Task], jobs: int = 1, progress: bool = True, desc: str = "sweep") -> dict[str, int]:
    """Run the tasks, ``jobs`` at a time; returns ``{task.name: exit status}``."""
    results: dict[str, int] = {}
    if not tasks:
        return results
    bar = _bar(len(tasks), desc, progress)
    _stopping.clear()
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = {pool.submit(run_task, t): t for t in tasks}
        for fut in _completed(futures):
            t = futures[fut]
            try:
                rc = fut.result()
            except Exception as e:  # noqa: BLE001 - reported as a failed task
                rc = 1
                with open(t.log, "a") as f:
                    f.write(f"synco sweep: could not run: {e!r}\n")
            results[t.name] = rc
            bar.update(1)
            failed = sum(1 for v in results.values() if v != 0)
            if failed:
                bar.set_postfix(failed=failed)
            if rc != 0:
                bar.write(f"synco sweep: {failure_text(t, rc)}")
    except BaseException:  # Ctrl-C / SIGTERM (synco's handler raises Interrupted), or a bug: stop the runs
        _stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        bar.write("synco sweep: stopping the running runs (each stops after its current step with a checkpoint); "
                  "re-run the same command to continue.")
        _stop_running()
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return results


def submitit_parameters(slurm: dict, jobs: Optional[int], name: str) -> dict:
    """``slurm:`` section of a spec -> ``AutoExecutor.update_parameters`` keyword arguments."""
    params: dict = {"name": name, "timeout_min": int(slurm.get("time") or 24 * 60)}
    if slurm.get("gpus") is not None:
        params["gpus_per_node"] = int(slurm["gpus"])
    if slurm.get("cpus") is not None:
        params["cpus_per_task"] = int(slurm["cpus"])
    if slurm.get("mem_gb") is not None:
        params["mem_gb"] = slurm["mem_gb"]
    if slurm.get("partition"):
        params["slurm_partition"] = str(slurm["partition"])
    if jobs:
        params["slurm_array_parallelism"] = int(jobs)
    params.update(slurm.get("extra") or {})
    return params


def make_executor(folder: Path, slurm: dict, jobs: Optional[int], name: str = "synco-sweep"):
    try:
        import submitit
    except ImportError:
        raise SyncoError("the slurm launcher needs submitit: pip install submitit") from None
    cluster = slurm.get("cluster")
    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError:
        raise SyncoError("no SLURM cluster found here (sbatch is not on the PATH). Run on a SLURM login node, "
                         "use --launcher local, or set slurm: {cluster: local} in the spec to run the jobs with "
                         "submitit's local executor.") from None
    except ValueError as e:
        raise SyncoError(f"slurm.cluster: {e}") from None
    try:
        ex.update_parameters(**submitit_parameters(slurm, jobs, name))
    except (NameError, AssertionError, ValueError, TypeError) as e:
        raise SyncoError(f"invalid slurm settings for submitit: {' '.join(str(e).split())}") from None
    return ex


def run_submitit(tasks: list[Task], folder: Path, slurm: dict, jobs: Optional[int] = None, progress: bool = True,
                 desc: str = "sweep", poll_s: float = 2.0) -> dict[str, int]:
    """One submitit job per task (a job array); waits for all; returns ``{task.name: exit status}``."""
    results: dict[str, int] = {}
    if not tasks:
        return results
    ex = make_executor(folder, slurm, jobs)
    submitted = ex.map_array(run_task, tasks)
    bar = _bar(len(tasks), desc, progress)
    pending = dict(zip(submitted, tasks))
    try:
        while pending:
            for job in [j for j in pending if j.done()]:
                t = pending.pop(job)
                try:
                    rc = int(job.result())
                except Exception as e:  # noqa: BLE001 - the job died (timeout, preemption, node failure)
                    rc = 1
                    with open(t.log, "a") as f:
                        f.write(f"synco sweep: submitit job {job.job_id} failed: {str(e)[-2000:]}\n")
                results[t.name] = rc
                bar.update(1)
                if rc != 0:
                    bar.write(f"synco sweep: {failure_text(t, rc)} (job {job.job_id})")
            if pending:
                time.sleep(poll_s)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or getattr(e, "signum", None):
            bar.write("synco sweep: interrupted; the submitted jobs keep running (cancel them with scancel). "
                      "Re-running the same command later collects what finished and re-runs the rest.")
        raise
    finally:
        bar.close()
    return results


def run_tasks(tasks: list[Task], launcher: str, jobs: Optional[int], out: Path, slurm: dict,
              progress: bool = True, desc: str = "sweep") -> dict[str, int]:
    if launcher == "local":
        return run_local(tasks, jobs or 1, progress, desc)
    if launcher == "slurm":
        return run_submitit(tasks, Path(out) / ".submitit", slurm, jobs, progress, desc)
    raise SyncoError(f"unknown launcher '{launcher}' (valid: {', '.join(LAUNCHERS)}).")
