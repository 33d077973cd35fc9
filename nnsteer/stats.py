"""Bootstrap tests of a mean against 0, and Holm's adjustment for many tests at once.

A study tests many conditions (behaviours × directions × vectors × coefficients) at
once; at 5% each, some would pass by chance. :func:`holm` adjusts their p-values so
that the chance of any false claim among them stays at 5% (Holm 1979, step-down).

Example:
    >>> holm([0.01, 0.04, 0.03, 0.005])
    [0.03, 0.06, 0.06, 0.02]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: The level of every test and interval (a 95% interval; p < 0.05).
ALPHA = 0.05
#: Fewest resamples of a p-value: the smallest p is ``2 / (draws + 1)``, and Holm over
#: ``m`` tests needs it below ``0.05 / m`` (m up to about 500 here).
P_DRAWS = 20000


def bootstrap_means(values: Sequence[float] | np.ndarray, n_boot: int = 2000,
                    seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of non-empty ``values``."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)


def bootstrap_p(values: Sequence[float] | np.ndarray, n_boot: int = P_DRAWS, seed: int = 0) -> float:
    """Two-sided bootstrap p-value of "the mean of ``values`` is 0".

    Twice the smaller share of resampled means on either side of 0 (each counted with
    one added to both counts, so that p is never 0): the dual of the percentile interval
    of :func:`nnsteer.stats.bootstrap_interval` with the same ``n_boot`` and ``seed``,
    which excludes 0 about when p < 0.05.
    """
    means = bootstrap_means(values, n_boot, seed)
    below = (np.count_nonzero(means <= 0) + 1) / (n_boot + 1)
    above = (np.count_nonzero(means >= 0) + 1) / (n_boot + 1)
    return float(min(1.0, 2 * min(below, above)))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values, in input order; a None (no test) stays None and is not counted.

    Sorted ascending, the k-th of m p-values (k from 1) becomes
    ``max over j <= k of min(1, (m - j + 1) * p_(j))``.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (NaNs if there are none)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    means = bootstrap_means(values, n_boot, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
