"""Uncertainty: bootstrap confidence intervals, the paired bootstrap, McNemar's exact test.

Resampling is over items (the unit a test set samples), seeded, 1000 resamples by default;
the 95% interval is the 2.5th and 97.5th percentile of the resampled statistic.
"""

import numpy as np

from tunelab.evaluation.metrics import aggregate


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(name: str, values: list, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> list | None:
    """[low, high] of the metric's headline over resampled items (None for fewer than 2 items)."""
    n = len(values)
    if n < 2:
        return None
    stats = _resample(name, values, _indices(n, resamples, seed))
    a = (1 - level) / 2
    return [float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))]


def _resample(name: str, values: list, idx: np.ndarray) -> np.ndarray:
    if name == "bleu":  # corpus BLEU from summed statistics of each resample
        arr = np.asarray(values)
        return np.array([aggregate("bleu", arr[row].sum(axis=0, keepdims=True).tolist()) for row in idx])
    arr = np.asarray(values, dtype=float)
    return arr[idx].mean(axis=1)


def paired_bootstrap(name: str, a: list, b: list, resamples: int = 1000, seed: int = 0) -> dict:
    """B minus A on the same items: the difference, its 95% CI, and a two-sided p-value.

    Each resample draws the same items for both models (that is the pairing); p is twice the
    share of resamples on the smaller side of zero (Koehn 2004; Berg-Kirkpatrick et al. 2012).
    """
    if len(a) != len(b):
        raise ValueError("paired bootstrap needs the same items for both models")
    diff = aggregate(name, b) - aggregate(name, a)
    if len(a) < 2:
        return {"diff": diff, "ci95": None, "p_value": None}
    idx = _indices(len(a), resamples, seed)
    d = _resample(name, b, idx) - _resample(name, a, idx)
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {"diff": float(diff), "ci95": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))], "p_value": p}


def mcnemar(a_correct: list, b_correct: list) -> dict:
    """McNemar's exact test on paired right/wrong outcomes (binomial on the discordant pairs)."""
    from scipy.stats import binomtest

    only_a = sum(bool(x) and not bool(y) for x, y in zip(a_correct, b_correct))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a_correct, b_correct))
    n = only_a + only_b
    p = float(binomtest(only_a, n, 0.5).pvalue) if n else 1.0
    return {"a_right_b_wrong": only_a, "b_right_a_wrong": only_b, "p_value": p}
