"""The comparison's statistics: means over seeds, perplexity, and the rule that says whether a loss difference is
real (:func:`compare_values`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["Comparison", "compare_values", "mean", "sd", "ppl"]


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


@dataclass
class Comparison:
    """A candidate's value against a reference's, judged with a stated threshold."""

    reference: float
    candidate: float
    difference: float
    """``candidate - reference``."""
    threshold: float
    """Smallest difference counted as real."""
    noise: Optional[float]
    """Standard error of the paired difference across seeds; None with one seed."""
    outcome: str
    """``"better"``, ``"worse"`` or ``"same"`` for the candidate (lower is better)."""


def compare_values(reference: Sequence[float], candidate: Sequence[float], *, min_effect: float,
                   noise_factor: float = 2.0) -> Comparison:
    """Judge paired per-seed values where LOWER is better (losses).

    The difference is the mean of ``candidate[i] - reference[i]``. It counts as real when its magnitude exceeds
    ``threshold = max(min_effect, noise_factor · SE)``, SE being the standard error of the paired differences
    (seeds ≥ 2; with one seed there is no noise estimate and only ``min_effect`` applies).
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"reference and candidate need the same, non-zero number of seeds, got {len(reference)} "
                         f"and {len(candidate)}")
    if not (isinstance(min_effect, (int, float)) and min_effect >= 0):
        raise ValueError(f"min_effect must be a number >= 0, got {min_effect!r}")
    diffs = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mean_diff = float(diffs.mean())
    noise = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) >= 2 else None
    threshold = max(float(min_effect), noise_factor * noise) if noise is not None else float(min_effect)
    outcome = "same" if abs(mean_diff) <= threshold else ("better" if mean_diff < 0 else "worse")
    return Comparison(float(np.mean(reference)), float(np.mean(candidate)), mean_diff, threshold, noise, outcome)
