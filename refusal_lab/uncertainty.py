"""Uncertainty over prompts or pairs (bootstrap intervals), rank agreement, and arrays as JSON holds them.

A leaf: it imports nothing from the package, so methods, experiments and the results writer all
depend on it without depending on each other.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import stats


def bootstrap_ci(values: np.ndarray, resamples: int, level: float, seed: int, min_pairs: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the mean over pairs (axis 0), resampling pairs; cells a pair lacks are NaN and skipped.

    Written by hand rather than with ``scipy.stats.bootstrap``: a pair lacks some cells (positions
    outside its span), so one resample of pairs must give every cell the NaN-skipping mean of the
    pairs it drew, and scipy resamples each cell's values on their own or not at all with NaNs.
    A cell measured on fewer than ``min_pairs`` pairs gets no interval (NaN): resampling one or two
    values gives an interval that looks far more certain than it is.
    """
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    if n == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan
    means = np.empty((resamples, *values.shape[1:]))
    tail = (1 - level) / 2
    with warnings.catch_warnings():  # a cell no resampled pair has is NaN, as it should be
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(resamples):
            means[i] = np.nanmean(values[rng.integers(0, n, n)], axis=0)
        low, high = np.nanquantile(means, tail, axis=0), np.nanquantile(means, 1 - tail, axis=0)
    too_few = np.sum(~np.isnan(values), axis=0) < min_pairs
    low[too_few] = np.nan
    high[too_few] = np.nan
    return low, high


def nan_mean(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0) if values.shape[0] else np.full(values.shape[1:], np.nan)


def mean_with_interval(values: np.ndarray, resamples: int, level: float, seed: int, min_values: int = 3) -> dict[str, float | None]:
    """The mean of one number per prompt (a 0/1 refusal, a score) with its percentile bootstrap interval over prompts.

    Fewer than ``min_values`` prompts get no interval, as in ``bootstrap_ci``.
    """
    column = np.asarray(values, dtype=float).ravel()
    mean = float(np.mean(column)) if column.size else float("nan")
    low = high = float("nan")
    if column.size >= min_values:
        interval = stats.bootstrap((column,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
                                   vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return {"mean": round(mean, 5), "ci_low": to_json(np.float64(low)), "ci_high": to_json(np.float64(high)), "n": int(column.size)}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (scipy's, ties given their average rank); NaN for fewer than 3 components (it would be
    +-1 by construction) or where either side is constant."""
    if a.size < 3 or np.all(a == a.flat[0]) or np.all(b == b.flat[0]):
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of the k largest (signed) of ``a`` that are also among the k largest of ``b``.

    NaN unless there are more than k components: with k or fewer, every component is in both tops.
    """
    if k < 1 or a.size <= k:
        return float("nan")
    return len(set(np.argsort(-a)[:k].tolist()) & set(np.argsort(-b)[:k].tolist())) / k


def to_json(array: np.ndarray) -> Any:
    """Nested lists with NaN as None, rounded: arrays as the results file holds them."""
    return [to_json(a) for a in array] if array.ndim else (None if np.isnan(array) else round(float(array), 5))
