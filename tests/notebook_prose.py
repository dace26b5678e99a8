"""The checks that keep a notebook's prose true (tests/test_notebook_prose.py runs them on the study's notebooks and on
planted cases): a markdown cell states no measured number, names only attributes that exist, and no output shows a
path of the machine that ran it."""
from __future__ import annotations

import importlib
import re

# a measured quantity: a percentage, points, a duration, a speed-up, a value with its interval, a "from -> to"
MEASURED = re.compile(r"\d+(?:\.\d+)?\s*(?:%|percent\b|points?\b|minutes?\b|min\b|seconds?\b|ms\b|hours?\b|h\b)"
                      r"|\d+(?:\.\d+)?x (?:faster|slower)"
                      r"|\d+(?:\.\d+)?%?\s*\[\d+(?:\.\d+)?, \d+(?:\.\d+)?\]"
                      r"|\d+(?:\.\d+)?%?\s*(?:->|→)\s*\d")
# settings, not measurements: the confidence level of every interval
ALLOWED = re.compile(r"95% (?:interval|confidence|CI|Clopper)|95%\s+intervals|\(95%\)")
# a name in backticks that must exist: cliplab.x.y, profile.x.y
NAME = re.compile(r"`((?:cliplab|profile)(?:\.\w+)+)")
# a path of the machine that executed the notebook
LOCAL_PATH = re.compile(r"PosixPath\(|(?<![\w.])/(?:home|work|tmp|root|Users|private|var/folders)/")


def measured_numbers(text: str) -> list[str]:
    """The measured quantities ``text`` states."""
    return [m.group(0) for m in MEASURED.finditer(ALLOWED.sub("", text))]


def missing_names(text: str, profile) -> list[str]:
    """The ``cliplab.*`` and ``profile.*`` names in backticks in ``text`` that do not resolve."""
    missing = []
    for name in NAME.findall(text):
        root, *attributes = name.split(".")
        if not _resolves(profile if root == "profile" else importlib.import_module("cliplab"), attributes, root):
            missing.append(name)
    return missing


def _resolves(obj, attributes: list[str], path: str) -> bool:
    for attribute in attributes:
        path = f"{path}.{attribute}"
        if hasattr(obj, attribute):
            obj = getattr(obj, attribute)
            continue
        try:  # a submodule not yet imported
            obj = importlib.import_module(path)
        except ImportError:
            return False
    return True


def output_text(cell) -> str:
    """Everything a code cell's outputs show as text."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append("".join(output.get("text", "")))
        for kind, value in output.get("data", {}).items():
            if kind.startswith("text/"):
                parts.append("".join(value))
    return "\n".join(parts)


def problems(notebook, profile) -> list[str]:
    """Every prose problem of ``notebook``: "cell N: ..." per finding."""
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown":
            found += [f"cell {index}: states a measured number: {m!r}" for m in measured_numbers(cell.source)]
            found += [f"cell {index}: names what does not exist: {n}" for n in missing_names(cell.source, profile)]
        elif LOCAL_PATH.search(output_text(cell)):
            found.append(f"cell {index}: an output shows a local path: {LOCAL_PATH.search(output_text(cell))[0]}")
    return found
