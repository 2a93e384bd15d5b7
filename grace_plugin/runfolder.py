"""Output folders that stay consistent: one writer at a time, and a run folder replaced as one unit.

* :func:`folder_lock` takes an exclusive ``fcntl.flock`` on ``<parent>/.<name>.lock`` (beside the folder, so the
  lock outlives the folder being swapped). A second ``grace train`` / ``grace eval`` into the same ``--out`` fails
  at once with one line naming the folder and the pid that holds it. The kernel drops the lock when the holder
  exits, however it exits (kill -9 included), so a stale lock file never blocks anyone. With ``wait`` the second
  process waits for the lock instead (saying so once): the testbed's shared world and tiny CLIP, which the first
  process writes and every later one reuses (two `grace study` lanes on one ``--out``).
* :class:`StagedRun`: a training run writes everything (config, log, resumable state, weights, checkpoint.json)
  into ``<parent>/.<name>.partial/`` on the same filesystem; when the run is complete the folder is swapped into
  place with one ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel or filesystem lacks it). ``--out``
  is therefore always the old complete run or the new complete run, never a mix (new weights beside an old
  checkpoint.json). A killed run leaves ``--out`` untouched and its state in the partial folder, where
  ``--resume`` finds it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path
from collections.abc import Callable, Iterator

from .tensor_io import CheckpointError, raise_disk_full
from .errors import GraceError

__all__ = ["RunFolderError", "RunLockedError", "folder_lock", "check_output_dir", "StagedRun", "partial_dir",
           "exchange_dirs"]


class RunFolderError(GraceError, ValueError):
    """An output folder that cannot be used (a file, read-only, ...); the message names it and the flag."""


class RunLockedError(RunFolderError):
    """Another process is writing the same output folder."""


def _first_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(folder: str | Path, flag: str = "--out") -> Path:
    """``folder`` can be created or written: not an existing file, and on a writable filesystem/folder."""
    p = Path(folder).expanduser()
    if p.exists() and not p.is_dir():
        raise RunFolderError(f"{flag} {p}: exists and is not a folder")
    base = _first_existing(p)
    if not base.is_dir():
        raise RunFolderError(f"{flag} {p}: {base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunFolderError(f"{flag} {p}: {base} is not writable")
    return p


@contextlib.contextmanager
def folder_lock(folder: str | Path, flag: str = "--out", what: str = "run folder",
                wait: Callable[[str], object] | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for the duration of the block (see the module docstring); held
    elsewhere: refused with one line, or, with ``wait`` (an echo), waited for after saying so through it."""
    import fcntl

    p = check_output_dir(folder, flag)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        lock = p.parent / f".{p.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise_disk_full(e, p)
        raise RunFolderError(f"{flag} {p}: cannot create its lock file ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            if wait is not None:
                wait(f"      waiting for pid {holder}, another grace process writing this {what} ({p})")
                fcntl.flock(fd, fcntl.LOCK_EX)  # the holder's exit releases it, however it exits
            else:
                raise RunLockedError(f"{flag} {p}: another grace process (pid {holder}) is writing this {what}; "
                                     "wait for it to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield p
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def partial_dir(out: str | Path) -> Path:
    """Where a run into ``out`` is staged until complete (same filesystem, so the final rename is atomic)."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}.partial"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fsync_tree(root: Path) -> None:
    """Flush every file (and folder entry) of ``root`` to disk before it is published by a rename."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with contextlib.suppress(OSError):
            fd = os.open(dirpath, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class StagedRun:
    """A run folder written as one unit: work in :attr:`work`, then :meth:`commit` swaps it into :attr:`out`."""

    def __init__(self, out: str | Path):
        self.out = Path(out).expanduser()
        self.work = partial_dir(self.out)

    def begin(self, resume: bool = False) -> Path:
        """Prepare the work folder: kept as it is for ``resume`` (the killed run's state), else started empty."""
        if self.work.exists() and not resume:
            shutil.rmtree(self.work)
        try:
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise_disk_full(e, self.work)
            raise RunFolderError(f"--out {self.out}: cannot create {self.work} ({e.strerror or e})") from None
        return self.work

    def resumable_state(self, name: str = "train_state.pt") -> Path | None:
        """The state to continue from, if any: a killed run's, in the work folder; or a finished run's, in ``out``
        (``--resume`` extending it to more steps), whose files are then copied into the work folder so the extended
        run is staged and published like any other."""
        if (self.work / name).is_file():
            return self.work / name
        finished = self.out / name
        if finished.is_file():
            for f in self.out.iterdir():
                if f.is_file() and not (self.work / f.name).exists():
                    shutil.copy2(f, self.work / f.name)
            return self.work / name
        return None

    def commit(self) -> Path:
        """Publish the work folder as ``out`` in one step; the previous run (if any) is then deleted."""
        if not self.work.is_dir():
            raise CheckpointError(f"{self.work}: nothing to publish")
        _fsync_tree(self.work)
        if self.out.exists():
            if exchange_dirs(self.work, self.out):
                shutil.rmtree(self.work, ignore_errors=True)  # now holds the previous run
            else:
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.work, self.out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.work, self.out)
        with contextlib.suppress(OSError):
            fd = os.open(self.out.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.out
