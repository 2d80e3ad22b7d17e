"""The studies normlab publishes, each defined once as its cells: today the normalization study, second edition
(which norm, when, on normlab's network and defaults; docs/study.md holds its design and results).

Its cells: batch norm (bn) at 2 ... 128 images per normalization statistic, batch renormalization (brn) at 2 ... 32,
the norms that read no batch statistics once each, and bn at 2 and 4 without precise BN (statistics not re-estimated
after training). A rectangular ``--grid`` cannot express this set, so it is a union of rectangles (``plan.Part``)
that the sweep machinery trains into one sweep folder (``normlab study``, ``api.study``), seed 0 of every cell first:
a study cut short, or trained over several sittings, holds whole seeds.
"""
from __future__ import annotations

from normlab.plan import Part, parse_grid

SEEDS = 3  # seeds per cell
# norm_batch 0 is the whole batch (batch norm's default): the figures draw it at the batch size, 128.
CELLS: tuple[tuple[tuple[str, ...], dict[str, tuple]], ...] = (
    (("bn",), {"norm_batch": (0, 2, 4, 8, 16, 32)}),
    (("brn",), {"norm_batch": (2, 4, 8, 32)}),
    (("gn", "ln", "in", "none", "frn"), {}),   # they read no batch statistics: one cell each
    (("bn",), {"norm_batch": (2, 4), "precise_bn": (0,)}),  # what re-estimating the statistics does at small batches
)


def parts() -> tuple[Part, ...]:
    """The study's rectangles, their values typed as the settings are."""
    return tuple((norms, parse_grid(grid)) for norms, grid in CELLS)
