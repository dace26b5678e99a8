"""The evaluation's tables: ``format_accuracy_table`` (plain text, one row per model, one column per radius) and
``robustness_table`` (Markdown, attack by attack), both from ``Proportion``'s one rendering of a value and its CI.
"""
from __future__ import annotations

from collections.abc import Mapping

from .ensemble import RobustnessReport
from .statistics import Proportion


def format_accuracy_table(rows: Mapping[str, Mapping[float, Proportion]]) -> str:
    """A plain-text table of ``accuracy_vs_eps`` results: one row per model, one column per radius.

    Each cell is ``value [low, high]`` in percent (95% Clopper-Pearson interval, rounded to whole
    points); the header names each radius in units of 1/255 and the sample size(s).
    """
    radii = list(next(iter(rows.values())))
    sizes = sorted({p.n for row in rows.values() for p in row.values()})
    header = ["clean" if eps == 0 else f"{255 * eps:g}/255" for eps in radii]
    cells = {name: [p.percent(digits=0) for p in row.values()] for name, row in rows.items()}
    width = max(len(c) for row in cells.values() for c in row)
    name_width = max(len(name) for name in rows)
    lines = [f"accuracy in % [95% CI], n={', '.join(map(str, sizes))} images",
             f"{'':>{name_width}}  " + "  ".join(f"{h:>{width}}" for h in header)]
    lines += [f"{name:<{name_width}}  " + "  ".join(f"{c:>{width}}" for c in row) for name, row in cells.items()]
    return "\n".join(lines)


def robustness_table(reports: Mapping[str, RobustnessReport]) -> str:
    """A Markdown table, one row per report (e.g. per eps or per model): clean, each attack, the worst case.

    Each cell is ``value% [low, high]`` (95% Clopper-Pearson interval); the header gives n."""
    attacks = list(dict.fromkeys(name for report in reports.values() for name in report.per_attack))
    sizes = sorted({report.clean.n for report in reports.values()})
    header = ["", "clean", *[f"after {name}" for name in attacks], "worst case"]
    lines = [f"robust accuracy in % [95% CI], n={', '.join(map(str, sizes))} images; each attack runs on the "
             "images the earlier ones left standing", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, report in reports.items():
        cells = [report.clean, *[report.per_attack.get(name) for name in attacks], report.robust]
        lines.append(f"| {label} | " + " | ".join("-" if p is None else p.percent() for p in cells) + " |")
    return "\n".join(lines)
