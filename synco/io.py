"""File helpers every layer may use: atomic writes, safe loading of torch files, output folders.

* Writes go to a temp file in the same folder (``.NAME.tmpPID``), are fsynced and renamed: readers never
  see half a file. A failed write removes its temp file; a full disk says ``disk full: N bytes needed at
  PATH``. Temp files leaked by a killed process are removed by :func:`remove_stale_temps`.
* :func:`check_output_dir` refuses an output location that cannot be written before any work is done.
* :class:`DirLock` keeps two runs out of one output folder (a lock file holding the owner's PID and command);
  :func:`claimed_output_dir` checks a folder and holds its lock for a block.
* :func:`find_yaml` says where an argument that is "a YAML path or a shipped name" (presets, sweep specs) points.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import SyncoError

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


class _CountingSink:
    """A write-only file object that only counts bytes (to tell how much a failed write needed)."""

    def __init__(self):
        self.n = 0

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


def _disk_full_in(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_failed(exc: BaseException, path: Path, needed: Callable[[], Optional[int]]) -> SyncoError:
    """The user-facing error for a failed write of ``path`` (``needed()`` gives its full size)."""
    free = _free_bytes(path.parent)
    size = None
    try:
        size = needed()
    except Exception:  # noqa: BLE001 - best effort: the message still names the path
        size = None
    full = _disk_full_in(exc) or (size is not None and free is not None and free < size)
    if full or (isinstance(exc, RuntimeError) and "enforce fail" in str(exc) and size is None):
        n = f"{size} bytes" if size is not None else "more space"
        have = f" ({free} bytes free there)" if free is not None else ""
        return SyncoError(f"disk full: {n} needed at {path}{have}. Nothing half-written was left behind; free "
                          "some space (or choose another --out) and re-run the same command: a pretraining run "
                          "resumes from its last complete checkpoint.")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
    return SyncoError(f"cannot write {path}: {reason}. Check that the folder is writable and has free space.")


def _atomic_replace(path, write_tmp: Callable[[Path], None], needed: Callable[[], Optional[int]]) -> None:
    """``write_tmp(tmp)`` writes a temp file beside ``path``; fsync it, rename it over ``path``. On any failure the
    temp file is removed, and a write error becomes a SyncoError (a full disk says how many bytes it needed)."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        write_tmp(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)) or _disk_full_in(e):
            raise _write_failed(e, path, needed) from None
        raise


def _atomic_write(path, write: Callable, needed: Callable[[], Optional[int]]) -> None:
    """The same through an open binary file: ``write(f)``."""
    def write_tmp(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    _atomic_replace(path, write_tmp, needed)


def atomic_save(obj, path) -> None:
    """torch.save to a temp file in the same folder, fsync, rename: readers never see half a file."""
    def needed() -> int:
        sink = _CountingSink()
        torch.save(obj, sink)
        return sink.n

    _atomic_write(path, lambda f: torch.save(obj, f), needed)


def atomic_write_text(text: str, path) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()), lambda: len(text.encode()))


def atomic_write_bytes_with(path, write: Callable[[Path], None], size: Optional[int] = None) -> None:
    """Atomic write through a library that wants a file name (``write(tmp_path)``), e.g. safetensors;
    ``size`` (about how many bytes it writes) goes into a disk-full message."""
    _atomic_replace(path, write, lambda: size)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder) -> list[Path]:
    """Delete ``.NAME.tmpPID`` files in ``folder`` whose writer process is gone (a SIGKILL during a write
    leaks them); a live process's temp file is left alone. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TMP_RE.match(entry.name)
        if not m or not entry.is_file():
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def load_torch_file(path) -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for corrupt or foreign files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SyncoError(f"'{path}' does not exist.") from None
    except Exception as e:  # noqa: BLE001 - any unpickling/IO failure is the user's file
        text = str(e).strip()
        if "Weights only load failed" in text or "weights_only" in text:
            # torch's message advises weights_only=False (arbitrary code execution): never pass that on.
            why = "it holds Python objects other than tensors and plain containers, which synco never unpickles"
        else:
            first = text.splitlines()[0] if text else ""
            first = first.split(". This is an internal miniz error")[0][:200]
            why = f"{e.__class__.__name__}: {first}" if first else e.__class__.__name__
        raise SyncoError(f"cannot read '{path}' ({why}). It may be corrupt, truncated or not a synco file.") from None


# ---------------------------------------------------------------------------------------------
# Output folders

_FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")


def check_output_dir(path, what: str = "--out") -> Path:
    """Create ``path`` if needed and prove it writable (a probe file), before any work is done; a clear
    error for an existing file, a read-only filesystem, no permission, or a location under /proc, /sys, /dev."""
    path = Path(path)
    resolved = Path(os.path.abspath(path))
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: pathlib's "Symlink loop"; mkdir below reports it (ELOOP)
        pass
    for root in _FORBIDDEN_ROOTS:
        if resolved == Path(root) or Path(root) in resolved.parents:
            raise SyncoError(f"{what} '{path}' is under {root}, a kernel filesystem, not a place for files; "
                             "choose a folder on a disk.")
    if path.is_symlink() and not path.exists():
        raise SyncoError(f"{what} '{path}' is a symbolic link to '{os.readlink(path)}', which does not exist; create "
                         "that folder, or choose another.")
    if path.exists() and not path.is_dir():
        raise SyncoError(f"{what} '{path}' is an existing file, not a folder; choose a folder (it is created "
                         "if missing).")
    for parent in (path, *path.parents):  # the first existing ancestor must not be a file
        if parent.exists():
            if not parent.is_dir():
                raise SyncoError(f"{what} '{path}' cannot be created: '{parent}' is a file, not a folder.")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".synco-write-test", dir=path)
        try:
            os.write(fd, b"x")  # a full disk still lets an empty file be created
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise SyncoError(f"disk full: no space left at {what} '{path}'; free some space or choose another "
                             "folder.") from None
        reason = e.strerror or str(e)
        raise SyncoError(f"{what} '{path}' is not writable ({reason}); choose a folder you can write to.") from None
    return path


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (what a mkdir -p would create)."""
    missing = []
    try:
        for folder in (path, *path.parents):
            if folder.exists():
                break
            missing.append(folder)
    except OSError:  # a name the file system refuses: check_output_dir says why
        return []
    return missing


@contextlib.contextmanager
def claimed_output_dir(path, what: str, name: str = "--out"):
    """``check_output_dir`` then ``DirLock(path, what)`` for the whole block. When the block fails, the folders this
    call created are removed again if they are still empty: a command refused (a missing model, a bad class list)
    leaves no empty --out behind, while one that wrote something keeps it (it resumes from there)."""
    path = Path(path)
    created = _missing_folders(path)
    check_output_dir(path, name)
    try:
        with DirLock(path, what):
            yield path
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()  # only an empty folder goes
            except OSError:
                break
        raise


# ---------------------------------------------------------------------------------------------
# A YAML path or a shipped name


def find_yaml(name: str, package: str) -> tuple[Any, bool]:
    """Where an argument that is "a YAML path or the name of a YAML shipped in ``package``" points, and whether it
    is a path: ``(Path(name), True)`` when it ends in .yaml/.yml or exists (whether it can be read is for the
    reader to say, in its own words); else ``(package/NAME.yaml, False)``, a resource, or ``(None, False)`` when
    ``package`` ships no such file."""
    path = Path(name)
    try:
        is_path = path.suffix in (".yaml", ".yml") or path.exists()
    except OSError:  # a name too long for the file system: a path, whose reader says why it cannot be read
        is_path = True
    if is_path:
        return path, True
    shipped = resources.files(package) / f"{name}.yaml"
    return (shipped if shipped.is_file() else None), False


# ---------------------------------------------------------------------------------------------
# One run per output folder


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of a process (tells a reused PID from the original one), when /proc has it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class DirLock:
    """``DIR/.synco.lock`` holding the owner's PID, host, start time and command (``what``), created atomically.

    A second run on the same folder is refused, naming the PID and the holder's command (not the refused one's:
    a k-NN refused by a running fine-tune must say the fine-tune is there). A lock left by a killed run (its PID gone,
    or reused by another process) is taken over, so the same command resumes after a crash."""

    NAME = ".synco.lock"

    def __init__(self, folder, what: str = "run"):
        self.path = Path(folder) / self.NAME
        self.what = what
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: dict) -> bool:
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return True  # unreadable or half-written lock: its writer died while creating it
        if owner.get("host") not in (None, socket.gethostname()):
            return False  # another machine's process: cannot tell, keep out
        if pid == os.getpid():
            return True
        if not _pid_alive(pid):
            return True
        started = owner.get("start")
        now = _start_time(pid)
        return started is not None and now is not None and started != now

    def acquire(self) -> DirLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "what": self.what}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not owner and self.path.exists():
                    import time

                    time.sleep(0.05)  # the owner may be writing it right now
                    owner = self._owner()
                if self._stale(owner):
                    if self._owner() == owner:  # still the same stale owner (another taker may have won)
                        try:
                            self.path.unlink()
                        except FileNotFoundError:
                            pass
                    continue
                host = owner.get("host")
                where = f" on {host}" if host and host != socket.gethostname() else ""
                holder = owner.get("what") if isinstance(owner.get("what"), str) else "process"  # older locks: none
                raise SyncoError(
                    f"'{self.path.parent}' is in use by another synco {holder} (PID {owner.get('pid')}{where}); "
                    f"wait for it to finish or choose another --out. If no such process is running any more, "
                    f"delete {self.path}.") from None
            except OSError as e:
                raise SyncoError(f"cannot create the lock file {self.path}: {e.strerror or e}.") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me))
            except OSError as e:
                try:
                    self.path.unlink()
                except OSError:
                    pass
                if e.errno in _DISK_FULL:
                    raise SyncoError(f"disk full: cannot write the lock file {self.path}; free some space.") from None
                raise SyncoError(f"cannot write the lock file {self.path}: {e.strerror or e}.") from None
            self.held = True
            return self
        raise SyncoError(f"could not take the lock {self.path}: another process keeps re-creating it.")

    def release(self) -> None:
        if self.held:
            if self._owner().get("pid") == os.getpid():
                try:
                    self.path.unlink()
                except OSError:
                    pass
            self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
