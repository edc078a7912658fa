r"""The comparison's statistics: means over seeds, perplexity, and the rule that says whether a loss difference is
real (:func:`compare_values`).

The rule, for per-seed values where lower is better (losses), reference :math:`r_i` and candidate :math:`c_i`
with the same seed :math:`i = 1..n`:

.. math::

    d_i = c_i - r_i,\quad \bar d = \tfrac1n \sum_i d_i,\quad
    \mathrm{SE} = \frac{s_d}{\sqrt n},\quad
    \text{real} \iff |\bar d| > \max\bigl(\text{min\_effect},\ t_{1-\alpha/2,\,n-1}\cdot \mathrm{SE}\bigr)

that is, a two-sided paired t test at level :math:`\alpha` (default 0.05) on the per-seed differences, and a
difference larger than ``min_effect``. The test is paired, not Welch's: seed :math:`i` fixes the initialisation
and the data order for both optimizers, so the two runs of a seed share the seed's luck, and the differences
remove it (Welch's test would count it as noise of each optimizer). The critical value
:math:`t_{1-\alpha/2,n-1}` (12.71 at two seeds, 4.30 at three, 2.78 at five) replaces the normal approximation's 2,
which at two or three seeds calls a difference real far more often than :math:`\alpha`. With one seed there is no
noise estimate and only ``min_effect`` applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["ALPHA", "Comparison", "compare_values", "t_critical", "mean", "sd", "ppl"]

ALPHA = 0.05
"""Default significance level of the paired t test."""


def mean(xs) -> Optional[float]:
    """The mean of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def sd(xs) -> Optional[float]:
    """The sample standard deviation of the values that are not None (None for fewer than two)."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ppl(loss: Optional[float]) -> Optional[float]:
    """Perplexity ``exp(loss)`` (capped at exp(80)); None for None."""
    return None if loss is None else math.exp(min(loss, 80.0))


def t_critical(df: int, alpha: float = ALPHA) -> float:
    """The two-sided critical value of Student's t with ``df`` degrees of freedom: ``P(|T| > t) = alpha``."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(scipy_stats.t.ppf(1.0 - alpha / 2.0, df))


@dataclass
class Comparison:
    """A candidate's value against a reference's, judged with a stated threshold."""

    reference: float
    candidate: float
    difference: float
    """``candidate - reference`` (the mean of the per-seed differences)."""
    threshold: float
    """Smallest difference counted as real: ``max(min_effect, t_critical · noise)``."""
    noise: Optional[float]
    """Standard error of the paired difference across seeds; None with one seed."""
    t_critical: Optional[float]
    """Two-sided critical value of Student's t at ``seeds - 1`` degrees of freedom; None with one seed."""
    p_value: Optional[float]
    """Two-sided p-value of the paired t test; None with one seed."""
    alpha: float
    """Significance level of the test."""
    outcome: str
    """``"better"``, ``"worse"`` or ``"same"`` for the candidate (lower is better)."""


def _p_value(mean_diff: float, se: float, df: int) -> float:
    if se == 0.0:
        return 1.0 if mean_diff == 0.0 else 0.0
    return float(2.0 * scipy_stats.t.sf(abs(mean_diff) / se, df))


def compare_values(reference: Sequence[float], candidate: Sequence[float], *, min_effect: float,
                   alpha: float = ALPHA) -> Comparison:
    """Judge paired per-seed values where LOWER is better (losses), by the rule in this module's docstring: the
    mean paired difference counts as real when it exceeds ``min_effect`` and, with two seeds or more, passes a
    two-sided paired t test at level ``alpha``."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"reference and candidate need the same, non-zero number of seeds, got {len(reference)} "
                         f"and {len(candidate)}")
    if not (isinstance(min_effect, (int, float)) and min_effect >= 0):
        raise ValueError(f"min_effect must be a number >= 0, got {min_effect!r}")
    diffs = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    n, mean_diff = len(diffs), float(diffs.mean())
    noise = tc = p = None
    threshold = float(min_effect)
    if n >= 2:
        noise = float(diffs.std(ddof=1) / math.sqrt(n))
        tc = t_critical(n - 1, alpha)
        p = _p_value(mean_diff, noise, n - 1)
        threshold = max(threshold, tc * noise)
    outcome = "same" if abs(mean_diff) <= threshold else ("better" if mean_diff < 0 else "worse")
    return Comparison(float(np.mean(reference)), float(np.mean(candidate)), mean_diff, threshold, noise, tc, p,
                      float(alpha), outcome)
