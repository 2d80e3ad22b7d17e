"""Folders a call makes and takes back: created with their missing parents, removed again while empty.

A call that fails before it wrote anything worth keeping (a download, a run's first epoch) removes the folders it
created, so a mistyped ``--data-dir`` or ``--out`` leaves nothing behind; a folder that was there stays.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


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
