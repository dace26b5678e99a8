"""Exact (Clopper-Pearson) confidence bounds of a binomial proportion: the one implementation the package uses, for
the intervals on every accuracy (``Proportion.ci95``) and for randomized smoothing's certificates."""
from __future__ import annotations

import numpy as np
from scipy.stats import beta


def clopper_pearson(hits, n, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided (1 - alpha) lower and upper bounds of the proportion ``hits / n`` (elementwise over arrays).

    Together they form a two-sided (1 - 2 alpha) interval: ``alpha=0.025`` gives the exact 95% interval."""
    hits, n = np.asarray(hits), np.asarray(n)
    low = np.where(hits > 0, beta.ppf(alpha, np.maximum(hits, 1), n - hits + 1), 0.0)
    high = np.where(hits < n, beta.ppf(1 - alpha, hits + 1, np.maximum(n - hits, 1)), 1.0)
    return low, high
