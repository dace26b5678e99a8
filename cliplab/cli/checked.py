"""The checked outputs of the study's notebooks: the text of every cell marked ``NBVAL_CHECK_OUTPUT`` (the cells nbval
compares with the committed notebook), and how two versions of a notebook differ there. ``cliplab reproduce`` ends
by comparing what it ran with the committed outputs; ``benchmarks/compare_precisions.py`` lists every line."""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CHECK_MARK = "NBVAL_CHECK_OUTPUT"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def checked_outputs(path: Path) -> dict[int, list[str]]:
    """Code cell number (from 1) -> the text lines of that checked cell's outputs: what it printed, else its
    Markdown, else its plain text (no figure is checked)."""
    import nbformat

    code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    return {number: [line for output in cell.get("outputs", []) for line in "".join(_text(output)).splitlines()]
            for number, cell in enumerate(code, start=1) if CHECK_MARK in cell.source}


def _text(output) -> str | list[str]:
    data = output.get("data", {})
    return output.get("text") or data.get("text/markdown") or data.get("text/plain", "")


@dataclass(frozen=True)
class CellChange:
    """One checked cell whose lines differ between two versions of a notebook."""

    notebook: str
    cell: int
    pairs: tuple[tuple[str, str], ...]  # (before, after) of each changed line
    unpaired: int  # lines only one version has

    @property
    def largest(self) -> float | None:
        """The largest difference between the numbers of a changed line and its new version, in the units printed
        (points for a percentage); None where no pair holds the same count of numbers."""
        differences = [d for before, after in self.pairs if (d := largest_difference(before, after)) is not None]
        return max(differences, default=None)

    def summary(self) -> str:
        lines = len(self.pairs) + self.unpaired
        by = "" if self.largest is None else f", numbers by up to {self.largest:g}"
        differ = "1 line differs" if lines == 1 else f"{lines} lines differ"
        return f"{self.notebook}, code cell {self.cell}: {differ}{by}"


def largest_difference(before: str, after: str) -> float | None:
    """The largest difference between the numbers of two lines that hold as many numbers, else None."""
    a, b = NUMBER.findall(before), NUMBER.findall(after)
    if len(a) != len(b) or not a:
        return None
    return max(abs(float(x) - float(y)) for x, y in zip(a, b))


def changes(notebook: str, before: Mapping[int, list[str]], after: Mapping[int, list[str]]) -> list[CellChange]:
    """The checked cells of ``notebook`` whose lines differ between ``before`` and ``after`` (``checked_outputs`` of
    each version); a cell only one version checks counts as every line changed."""
    found = []
    for cell in sorted(before.keys() | after.keys()):
        old, new = before.get(cell, []), after.get(cell, [])
        if old == new:
            continue
        changed = [line for line in difflib.ndiff(old, new) if line[:2] in ("- ", "+ ")]
        removed, added = ([line[2:] for line in changed if line[0] == sign] for sign in "-+")
        pairs = tuple(zip(removed, added))
        found.append(CellChange(notebook, cell, pairs, len(changed) - 2 * len(pairs)))
    return found


def comparison(committed: Mapping[str, Mapping[int, list[str]]], executed: Mapping[str, Path],
               against: str = "the committed notebooks") -> str:
    """One paragraph: how many checked cells of the ``executed`` notebooks (stem -> path) read as in ``committed``
    (stem -> ``checked_outputs``), and each one that does not; empty where none of them checks a cell."""
    found, cells = [], 0
    for name, path in sorted(executed.items()):
        before = committed.get(name, {})
        after = checked_outputs(path)
        cells += len(before.keys() | after.keys())
        found += changes(name, before, after)
    if not cells:
        return ""
    if not found:
        return f"Checked outputs: all {cells} cells read as in {against}."
    return (f"Checked outputs: {cells - len(found)} of {cells} cells read as in {against}; these differ:\n"
            + "\n".join(f"  {change.summary()}" for change in found))
