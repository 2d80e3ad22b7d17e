"""The error types that the command line turns into one line on stderr (exit status 2).

Each is raised with a message that says what went wrong and what to do; the library raises them
and never exits, so a notebook sees the same messages as an exception.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# No space left, over quota, file too large: errors that only more room fixes, each reported as one DiskFullError line.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NormlabError(RuntimeError):
    """Any expected failure: the message is one line for the user."""


class ConfigError(NormlabError, ValueError):
    """A setting is out of range; the message says which and what is allowed."""


class DataError(NormlabError):
    """The data set is missing, unreadable or unsafe; the message says what to do."""


class TrainingError(NormlabError):
    """Training cannot go on (a non-finite loss, an unusable run folder); the message says why."""


class UsageError(NormlabError):
    """A command was given something it cannot use; the message says what to do."""


class ReportError(NormlabError):
    """A run folder is missing or incomplete; the message names what is missing and what to do."""


class SweepError(TrainingError):
    """Some cells of a sweep failed; the others finished. ``result`` is the sweep as it stands (its files are written)."""

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result

    def __reduce__(self):  # pickled with its result (the default keeps only the message)
        return type(self), (str(self), self.result)


class DiskFullError(NormlabError):
    """A write failed for want of room (ENOSPC, EDQUOT, EFBIG); the message names the folder and the space left."""


def no_space(e: OSError, path: str | os.PathLike, needed: int | None = None) -> DiskFullError | None:
    """The one line for ``e``, raised while writing ``path`` (``needed`` bytes, if known), if more room would fix it;
    None for any other OSError."""
    if e.errno not in NO_SPACE:
        return None
    folder = Path(path).parent
    free = None
    for existing in (folder, *folder.parents):  # a folder that could not be made: the space of the nearest one that is
        try:
            free = shutil.disk_usage(existing).free
            break
        except OSError:
            continue
    room = f"{size(free)} free there" if free is not None else "its free space unknown"
    need = f", {size(needed)} needed" if needed is not None else ""
    return DiskFullError(f"cannot write {Path(path).name} in {folder}: {e.strerror or os.strerror(e.errno)} ({room}{need}); "
                         "free some space there, or choose another folder")


def size(n: int) -> str:
    """Bytes for people: 212 kB, 1.3 MB, 2.1 GB (powers of 1000, as df -H and file managers count)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{max(1, round(n / 1e3)) if n else 0} kB"
