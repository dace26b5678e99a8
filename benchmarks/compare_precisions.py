"""The study in fp32 and in bf16 autocast: each run's time, and per checked cell what differs and by how much.

Runs ``cliplab reproduce`` (the README's main job, every notebook) once with ``--precision fp32`` and once with
``--precision bf16``, each into its own results directory, one after the other, and times each; or, with
``--compare A B``, only compares two directories of executed notebooks (``results/shapes`` of two earlier runs, or
``notebooks/`` against one). For every ``NBVAL_CHECK_OUTPUT`` cell (what nbval compares) it lists the output lines
that differ between the two, and for each differing line the largest difference between the numbers it holds, in
the units printed (points for percentages).

    python benchmarks/compare_precisions.py [--out /tmp/precisions]
    python benchmarks/compare_precisions.py --compare notebooks /tmp/precisions/bf16/shapes
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from cliplab.cli.checked import changes, checked_outputs, largest_difference


def compare(first: Path, second: Path) -> None:
    """Every checked line of the notebooks in ``first`` that reads otherwise in ``second``, with the largest
    difference between their numbers."""
    ours, theirs = ({path.stem: path for path in directory.glob("[0-9][0-9]_*.ipynb")} for directory in (first, second))
    print(f"\nchecked cells of {first} (-) against {second} (+):\n")
    cells = differing = 0
    for name in sorted(ours.keys() | theirs.keys()):
        before, after = (checked_outputs(found[name]) if name in found else {} for found in (ours, theirs))
        cells += len(before.keys() | after.keys())
        for change in changes(name, before, after):
            print(f"{name}, code cell {change.cell}:")
            for old, new in change.pairs:
                delta = largest_difference(old, new)
                print(f"  - {old}\n  + {new}" + ("" if delta is None else f"\n    largest difference: {delta:g}"))
            if change.unpaired:
                print(f"  (lines added or removed: {change.unpaired})")
            differing += 1
    print(f"\n{cells - differing} of {cells} checked cells read the same")


def run(precision: str, out: Path) -> Path:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cliplab", "reproduce", "--precision", precision, "--results",
                    str(out / precision)], check=True)
    print(f"cliplab reproduce --precision {precision}: {time.perf_counter() - start:.0f} s", flush=True)
    return out / precision / "shapes"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="only compare two directories of executed notebooks")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cliplab-precisions"))
    args = parser.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return
    compare(run("fp32", args.out), run("bf16", args.out))


if __name__ == "__main__":
    main()
