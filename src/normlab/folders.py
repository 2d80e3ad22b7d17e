"""Folders a call makes and takes back: created with their missing parents, removed again while empty.

A call that fails before it wrote anything worth keeping (a download, a run's first epoch) removes the folders it
created, so a mistyped ``--data-dir`` or ``--out`` leaves nothing behind; a folder that was there stays. And why a
path given is not there, in words (a loop of symbolic links is not "no such file").
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

MISSING = "no such file or folder"


def make(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns the folders created, innermost first (OSError as mkdir's)."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove ``folders``, innermost first, each while it is empty: stops at the first that is not (nor, then, its parents)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def why_missing(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be opened, in words: "no such file or folder", "a loop of symbolic links" (ELOOP, which
    ``Path.exists`` and ``is_file`` answer with a plain False), or the system's own words ("Permission denied")."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a loop of symbolic links (it points back to itself)"
        if e.errno != errno.ENOENT:
            return e.strerror or str(e)
    return MISSING
