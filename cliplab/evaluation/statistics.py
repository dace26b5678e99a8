"""``Proportion``: a measured proportion (accuracy, success rate) with its sample size and 95% CI."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._stats import clopper_pearson


@dataclass(frozen=True)
class Proportion:
    """A measured proportion (accuracy, success rate) with its sample size.

    Attributes:
        hits: number of successes (correct predictions, successful attacks).
        n: number of trials.
    """

    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        """Exact (Clopper-Pearson) two-sided 95% confidence interval."""
        if self.n == 0:
            return float("nan"), float("nan")
        low, high = clopper_pearson(self.hits, self.n, 0.025)
        return float(low), float(high)

    @classmethod
    def of(cls, hits: torch.Tensor) -> "Proportion":
        """The proportion of True in a boolean tensor (one entry per trial)."""
        return cls(int(hits.sum()), hits.numel())

    def as_dict(self) -> dict:
        """The proportion for a JSON file: value, hits, n, the 95% interval, and the text ``str`` gives."""
        return {"value": self.value, "hits": self.hits, "n": self.n, "ci95": list(self.ci95), "text": str(self)}

    def percent(self, digits: int = 1, unit: str = "") -> str:
        """``value [low, high]``: the value and its 95% interval in percent, with ``digits`` decimals; every table's
        cell. ``unit`` follows the value (``str`` writes ``%``)."""
        low, high = self.ci95
        return f"{100 * self.value:.{digits}f}{unit} [{100 * low:.{digits}f}, {100 * high:.{digits}f}]"

    def __str__(self) -> str:
        return f"{self.percent(unit='%')} (n={self.n})"
