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
import difflib
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def checked_outputs(directory: Path) -> dict[tuple[str, int], list[str]]:
    """(notebook, code cell number) -> the text lines of each checked cell's outputs."""
    cells = {}
    for path in sorted(directory.glob("[0-9][0-9]_*.ipynb")):
        code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
        for number, cell in enumerate(code, start=1):
            if "NBVAL_CHECK_OUTPUT" in cell.source:
                lines = []
                for output in cell.get("outputs", []):
                    text = output.get("text") or output.get("data", {}).get("text/markdown") \
                        or output.get("data", {}).get("text/plain", "")
                    lines.extend("".join(text).splitlines())
                cells[path.stem, number] = lines
    return cells


def largest_difference(before: str, after: str) -> float | None:
    """The largest difference between the numbers of two lines that hold as many numbers, else None."""
    a, b = NUMBER.findall(before), NUMBER.findall(after)
    if len(a) != len(b) or not a:
        return None
    return max(abs(float(x) - float(y)) for x, y in zip(a, b))


def compare(first: Path, second: Path) -> None:
    ours, theirs = checked_outputs(first), checked_outputs(second)
    print(f"\nchecked cells of {first} (-) against {second} (+):\n")
    same = 0
    for key in sorted(ours.keys() | theirs.keys()):
        before, after = ours.get(key, []), theirs.get(key, [])
        if before == after:
            same += 1
            continue
        print(f"{key[0]}, code cell {key[1]}:")
        removed = [line for line in difflib.ndiff(before, after) if line[:2] in ("- ", "+ ")]
        pairs = list(zip([line[2:] for line in removed if line[0] == "-"],
                         [line[2:] for line in removed if line[0] == "+"]))
        for old, new in pairs:
            delta = largest_difference(old, new)
            print(f"  - {old}\n  + {new}" + ("" if delta is None else f"\n    largest difference: {delta:g}"))
        if len(pairs) * 2 != len(removed):
            print("  (lines added or removed: " + str(len(removed) - 2 * len(pairs)) + ")")
    print(f"\n{same} of {len(ours.keys() | theirs.keys())} checked cells read the same")


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
