"""Asymmetry statistics: the target country's mean score minus the mean of the other countries' means,
with a stratified percentile bootstrap.

Each country's answers are resampled with replacement within that country (the design fixes how many
answers each country has), the statistic is recomputed on every replicate, and the interval is the
replicates' (alpha/2, 1 - alpha/2) percentiles. Replicates come from ``numpy.random.default_rng(seed)``,
so a report is reproducible. Before/after compares two independent samples (the same probes through two
arms): the replicates of each arm's asymmetry are drawn independently and subtracted pairwise.
Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), ch. 13 (percentile intervals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval."""

    value: float
    low: float
    high: float
    n_target: int
    """Answers of the target country."""
    n_others: int
    """Answers of the other countries together."""

    def as_dict(self) -> dict[str, float | int]:
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "n_target": self.n_target,
            "n_others": self.n_others,
        }


def asymmetry(groups: Mapping[str, Sequence[float]], target: str) -> float:
    """``mean(target) - mean(mean(c) for every other country c)``; each country weighs the same whatever
    its number of answers.

    Raises:
        ValueError: the target, or every other country, has no values.
    """
    _check(groups, target)
    others = [float(np.mean(v)) for c, v in groups.items() if c != target and len(v)]
    return float(np.mean(groups[target])) - float(np.mean(others))


def _check(groups: Mapping[str, Sequence[float]], target: str) -> None:
    if not len(groups.get(target, ())):
        raise ValueError(f"no values for the target {target!r}")
    if not any(len(v) for c, v in groups.items() if c != target):
        raise ValueError("no values for any country other than the target")


def replicates(
    groups: Mapping[str, Sequence[float]], target: str, reps: int, rng: np.random.Generator
) -> NDArray[np.float64]:
    """``reps`` bootstrap replicates of ``asymmetry`` (shape ``(reps,)``), resampling within countries."""
    _check(groups, target)

    def means(values: Sequence[float]) -> NDArray[np.float64]:
        data = np.asarray(values, dtype=np.float64)
        idx = rng.integers(0, len(data), size=(reps, len(data)))
        return data[idx].mean(axis=1)

    target_means = means(groups[target])
    other_means = np.stack([means(v) for c, v in sorted(groups.items()) if c != target and len(v)])
    return target_means - other_means.mean(axis=0)


def _interval(samples: NDArray[np.float64], level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap(
    groups: Mapping[str, Sequence[float]],
    target: str,
    *,
    reps: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[Estimate, NDArray[np.float64]]:
    """The asymmetry and its percentile interval.

    Args:
        groups: country -> that country's per-answer scores.
        target: the country compared with the rest.
        reps: bootstrap replicates.
        seed: for ``numpy.random.default_rng``.
        level: the interval's coverage (0.95: the 2.5th to 97.5th percentile).

    Returns:
        The estimate and its replicates (for differences between arms).

    Raises:
        ValueError: the target, or every other country, has no values.
    """
    samples = replicates(groups, target, reps, np.random.default_rng(seed))
    low, high = _interval(samples, level)
    n_others = sum(len(v) for c, v in groups.items() if c != target)
    return Estimate(asymmetry(groups, target), low, high, len(groups[target]), n_others), samples


def difference(
    after: tuple[Estimate, NDArray[np.float64]],
    before: tuple[Estimate, NDArray[np.float64]],
    level: float = 0.95,
) -> Estimate:
    """``after - before`` of two independently bootstrapped asymmetries (e.g. policy minus baseline)."""
    low, high = _interval(after[1] - before[1], level)
    return Estimate(after[0].value - before[0].value, low, high, after[0].n_target, after[0].n_others)
