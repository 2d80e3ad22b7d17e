"""A sweep's manifest, ``sweep.json``: what the sweep was asked to train (norms x grid parts, seeds, base settings),
written before anything trains; a study, a resumed sweep given more, or merged folders hold a union of parts."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab import studies
from normlab.config import Config, format_value
from normlab.device import Runtime
from normlab.errors import ReportError, UsageError
from normlab.plan import Cell, Grid, Part, cells_of, parse_grid
from normlab.rundir import atomic_write_text, cell_folder, check_writable, command, unwritable

MANIFEST = "sweep.json"
FORMAT = "normlab-sweep"


@dataclass(frozen=True)
class Manifest:
    """What a sweep was asked to train: the cells of ``parts`` (each norms x a grid; one part for ``normlab sweep``, a
    union of them for ``normlab study`` or merged sweeps) x ``seeds`` seeds from ``first_seed``, on ``base``."""

    base: Config
    parts: tuple[Part, ...]
    seeds: int
    first_seed: int

    @classmethod
    def sweep(cls, base: Config, norms: Sequence[str], grid: Grid, seeds: int, first_seed: int) -> "Manifest":
        """The manifest of one rectangle: norms x grid x seeds."""
        return cls(base, ((tuple(norms), dict(grid)),), seeds, first_seed)

    @property
    def norms(self) -> tuple[str, ...]:
        """Every norm of the sweep, in the order the parts name them."""
        return tuple(dict.fromkeys(n for norms, _ in self.parts for n in norms))

    @property
    def grid(self) -> Grid:
        """Every swept setting with every value some part gives it, in order of appearance."""
        out: dict[str, list[Any]] = {}
        for _, grid in self.parts:
            for k, values in grid.items():
                out.setdefault(k, []).extend(v for v in values if v not in out.get(k, []))
        return {k: tuple(v) for k, v in out.items()}

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def to_dict(self) -> dict[str, Any]:
        head: dict[str, Any] = {"format": FORMAT}
        if len(self.parts) == 1:  # one rectangle: the keys every version of the manifest has
            head |= _part_dict(self.parts[0])
        else:
            head["parts"] = [_part_dict(p) for p in self.parts]
        return {**head, "seeds": self.seeds, "first_seed": self.first_seed, "base": self.base.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        parts = d["parts"] if "parts" in d else [d]
        return cls(Config.from_dict(d["base"]), tuple((tuple(p["norms"]), parse_grid(p["grid"])) for p in parts),
                   int(d["seeds"]), int(d["first_seed"]))

    def cells(self) -> list[Cell]:
        return cells_of(self.parts)

    def config(self, norm: str, cell: dict[str, Any], seed: int | None = None) -> Config:
        """The settings a model of this sweep trains with: ``base`` with ``norm``, the ``cell``'s values and ``seed``."""
        return dataclasses.replace(self.base, norm=norm, **cell, **({} if seed is None else {"seed": seed}))

    def models(self, parent: Path) -> list[tuple[str, dict[str, Any], int, Path]]:
        """(norm, cell, seed, folder) of every model, in the order ``plan_cells`` trains them (seed by seed)."""
        return [(norm, cell, seed, cell_folder(parent, norm, cell, seed)) for seed in self.seed_list for norm, cell in self.cells()]

    def union(self, other: "Manifest", where: str) -> "Manifest":
        """This sweep and ``other`` as one (merged folders, a sweep resumed with more cells or seeds): the parts of both,
        the seeds of both. Refused (``UsageError``) where their base settings differ, or their seeds leave a gap."""
        diff = [f"{k} {format_value(a)} (and {format_value(b)})" for k, a, b in self.base.differences(other.base) if k not in ("norm", "seed")]
        if diff:
            raise UsageError(f"{where} holds a sweep of other base settings: {'; '.join(diff)}; one sweep folder holds models "
                             f"of one set of settings: choose another --out")
        seeds = sorted(set(self.seed_list) | set(other.seed_list))
        if seeds != list(range(seeds[0], seeds[-1] + 1)):
            raise UsageError(f"{where}: seeds {', '.join(map(str, seeds))} leave a gap; train the missing seeds first, "
                             "so that one sweep folder holds consecutive seeds")
        parts = self.parts + tuple(p for p in other.parts if p not in self.parts)
        return Manifest(self.base, parts, len(seeds), seeds[0])

    def command(self, parent: Path, data_dir: str | os.PathLike | None = None, runtime: Runtime | None = None,
                resume: bool = False) -> str:
        """The normlab command line that trains this sweep again (``rundir.command``): the data it reads (``data_dir``,
        where known) and the settings that differ from the defaults. A study is ``normlab study``; a union of other
        rectangles is one ``normlab sweep ... --resume`` line per rectangle, into the same folder."""
        lines, parts = [], list(self.parts)
        if parts[:len(studies.parts())] == list(studies.parts()):
            lines.append(command("study", parent, self.base, None, None, self.seeds, self.first_seed, data_dir, runtime, resume,
                                 default_seeds=studies.SEEDS))
            parts = parts[len(studies.parts()):]
        for norms, grid in parts:
            lines.append(command("sweep", parent, self.base, norms, grid, self.seeds, self.first_seed, data_dir, runtime,
                                 resume or len(self.parts) > 1))
        return "\n".join(lines)


def _part_dict(part: Part) -> dict[str, Any]:
    norms, grid = part
    return {"norms": list(norms), "grid": {k: list(v) for k, v in grid.items()}}


def is_sweep(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_manifest(parent: Path, manifest: Manifest, resume: bool) -> Manifest:
    """Record what the sweep trains, before it trains; returns the manifest written. A folder that holds another sweep
    is refused without ``resume``; with it, the folder's sweep grows by this one (the union: more cells or seeds, the
    same base settings). The same sweep's manifest is rewritten: one that stopped before its first model, e.g. on a
    wrong --ray address, just starts again."""
    path = Path(parent) / MANIFEST
    if path.exists():
        try:
            held = read_manifest(parent)
        except ReportError:
            held = None
        if held != manifest and not resume:
            raise UsageError(f"{parent} already holds another sweep ({MANIFEST}); use --resume to continue it (with this grid), "
                             "or choose another --out")
        if held is not None and resume:
            manifest = held.union(manifest, str(parent))
    check_writable(Path(parent))
    try:
        atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    except OSError as e:
        raise unwritable(parent, e) from None
    return manifest


def read_manifest(parent: Path) -> Manifest:
    path = Path(parent) / MANIFEST
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}")
        return Manifest.from_dict(d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{path} is not a readable normlab sweep manifest ({type(e).__name__}: {e}); "
                          f"pass a folder written by normlab sweep") from None
