"""Where a notebook's time goes: each code cell's wall time, executed as ``cliplab reproduce`` executes it.

The notebook runs in a fresh kernel with the profile's settings and ``--threads`` torch threads (the runner's
environment), into a temporary directory (the repository is not touched); the table gives each code cell's seconds
(``NotebookRun.cell_seconds``), its share, and the first line of its source.

Usage:
    python benchmarks/notebook_cells.py 02 04 --threads 2
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import nbformat

import cliplab
from cliplab.cli import reproduce as runner

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="+", help="notebook prefixes, e.g. 02 04")
    parser.add_argument("--profile", default="shapes")
    parser.add_argument("--threads", type=int, default=runner.usable_cores())
    args = parser.parse_args(argv)
    profile = cliplab.get_profile(args.profile, encoder_cache=NOTEBOOKS / "encoders" / args.profile)
    env = {**runner.kernel_environment(args.threads), "MPLBACKEND": "Agg"}
    with tempfile.TemporaryDirectory() as out:
        for path in runner.find_notebooks(NOTEBOOKS, args.only):
            run = asyncio.run(runner.execute_notebook(path, Path(out), {**env, **cliplab.study.profiles.profile_environment(
                profile.with_runtime(figures=str(Path(out) / "figures")))}, running=set()))
            cells = nbformat.read(path, as_version=4).cells
            print(f"\n{path.stem}: {run.seconds:.0f} s, {args.threads} threads"
                  f"{'' if run.error is None else ', FAILED: ' + run.error}")
            print("| cell | seconds | share | first line |\n|---:|---:|---:|---|")
            for number, seconds in run.cell_seconds.items():
                first = next(iter(cells[number - 1].source.splitlines()), "")
                print(f"| {number} | {seconds:.1f} | {100 * seconds / run.seconds:.0f}% | `{first[:70]}` |")


if __name__ == "__main__":
    main()
