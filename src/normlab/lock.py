"""One writer per run folder: an OS file lock (``flock``) on a small file in the folder, held while a model trains.

The operating system releases the lock when its process ends, however it ends, so a killed run never leaves a stale
lock: the file it leaves behind locks nothing. A writer that ends removes the file (while it still holds the lock, so
no one can have locked that file meanwhile; a writer that locked a file that was removed meanwhile tries again on the
new one). The file is hidden (its name starts with a dot), holds the holder's process id and is read by nothing else:
reports, ``normlab evaluate`` and Ray's file shipping skip dot files.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable
from pathlib import Path

from normlab import folders
from normlab.errors import TrainingError

LOCK = ".normlab.lock"
TRIES, PAUSE_S = 5, 0.05  # a reader (holder) takes the lock for microseconds: a writer tries a few times before it gives up


class Busy(TrainingError):
    """Another process is writing into the folder; the message names the folder and the process."""


def who(pid: int) -> str:
    return f"process {pid}" if pid else "another process"


class FolderLock:
    """The lock of one run folder, as a context manager. ``created``: folders a caller made for this writer, removed
    again (innermost first, only while empty) once the lock is released, so a refused or failed writer leaves none."""

    def __init__(self, folder: str | os.PathLike, created: Iterable[Path] = ()):
        self.folder = Path(folder)
        self.created = list(created)
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Take the lock; ``Busy`` (one line naming the folder and the holder) if another process has it."""
        path, busy = self.folder / LOCK, 0
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                folders.remove_empty(self.created)
                raise TrainingError(f"cannot write to output folder {self.folder} ({e.strerror or e}); choose another with --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                busy += 1
                if busy < TRIES:
                    time.sleep(PAUSE_S)
                    continue
                folders.remove_empty(self.created)
                raise Busy(f"{self.folder} is being written by {who(holder(self.folder) or 0)} (normlab); wait until it ends "
                           "or stop it, or choose another --out") from None
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder removed the file as it released it: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: the lock holds all the same, only its holder's id is not written
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.folder / LOCK).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        folders.remove_empty(self.created)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def holder(folder: str | os.PathLike) -> int | None:
    """The process id of the writer holding ``folder``'s lock (0 if it wrote none), or None if no one holds it."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)  # and with it the shared lock, at once
