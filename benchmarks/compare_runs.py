"""Test accuracy of `normlab run` parents side by side with a reference (benchmarks/gpu_check.sh, step d).

    python benchmarks/compare_runs.py REFERENCE.json RUN_PARENT [RUN_PARENT ...]
    python benchmarks/compare_runs.py --write REFERENCE.json RUN_PARENT --command "normlab run ..."

The reference holds each norm's test accuracy and settings of one run (for example the CPU run of the GPU
check's subset); each parent is printed beside it with the difference in points, and with the settings
that differ from the reference's (a reference made before a default changed is stale). One seed per
side: a difference of about a point is seed noise at 10,000 training images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from normlab.config import Config, format_value
from normlab.rundir import find_runs


def accuracies(parent: Path) -> dict[str, dict]:
    models, _ = find_runs(parent)
    return {norm: {"test_acc": runs[0].results.test_acc, "precision": runs[0].results.precision,
                   "device": runs[0].results.device, "config": runs[0].config.to_dict()}
            for norm, runs in models.items()}


def setting_differences(got: dict, ref: dict) -> str:
    """The settings of a run that differ from its reference's (a reference made before a default changed is stale)."""
    if "config" not in ref:
        return "; the reference records no settings"
    # Read as config.json files are: a setting the reference predates is the value it trained with.
    differences = Config.from_dict(got["config"]).differences(Config.from_dict(ref["config"]))
    diff = [f"{k} {format_value(v)} (reference {format_value(r)})" for k, v, r in differences]
    return f"; SETTINGS DIFFER: {', '.join(diff)}" if diff else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference")
    p.add_argument("runs", nargs="+")
    p.add_argument("--write", action="store_true", help="write the reference from the first run instead of comparing")
    p.add_argument("--command", default="", help="with --write: the command that made the run")
    args = p.parse_args()
    if args.write:
        Path(args.reference).write_text(json.dumps({"command": args.command, "models": accuracies(Path(args.runs[0]))}, indent=2) + "\n")
        return
    ref = json.loads(Path(args.reference).read_text()) if Path(args.reference).is_file() else {"command": f"none ({args.reference} is missing)", "models": {}}
    print(f"reference: {ref['command']}")
    for run in args.runs:
        try:
            got = accuracies(Path(run))
        except Exception as e:  # a failed run must not hide the others
            print(f"{run}: unreadable ({e})")
            continue
        for norm, r in got.items():
            base = ref["models"].get(norm, {}).get("test_acc")
            diff = f"{100 * (r['test_acc'] - base):+.2f} points" if base is not None and r["test_acc"] is not None else "no reference"
            shown = f"{100 * base:.2f}%" if base is not None else "–"
            print(f"{run} {norm} {r['precision']}: test {100 * r['test_acc']:.2f}% vs reference {shown} ({diff}) on {r['device']}"
                  f"{setting_differences(r, ref['models'].get(norm, {}))}")


if __name__ == "__main__":
    sys.exit(main())
