"""Bootstrap confidence intervals and repetition statistics (numpy only, pure functions).

Accuracies are means of per-example 0/1 outcomes; their 95% CIs are percentile bootstraps over
examples. A difference between two runs on the *same* examples (trained − vanilla, 2nd try − best-of-2)
is bootstrapped by resampling example indices jointly for both arrays, which keeps the per-example
correlation and so gives a narrower, honest CI than two independent bootstraps.

Failure evaluation (rrr.failure_eval): the unit is a failure (query, failed attempt 1) whose value is a
fix rate (mean of R retries); several failures of one query are correlated, so CIs resample *queries*
(clusters) and the standard error is the cluster-robust one. The minimum detectable effect at 80% power
is (z_{1-α/2} + z_{power}) · SE of the paired difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

MAX_INDEX_CELLS = 1 << 22  # resampled indices held in memory at once (~32 MB of int64)


def _as_outcomes(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty: a bootstrap needs at least one example")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf; drop or fill them before bootstrapping")
    return x


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of `x`; indices drawn in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    n = x.size
    rows = max(1, MAX_INDEX_CELLS // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # [chunk, n]
        means[start:stop] = x[idx].mean(axis=1)
    return means


def _percentile_interval(means: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of `values` (bools or floats) and its percentile-bootstrap CI."""
    x = _as_outcomes(values)
    means = _bootstrap_means(x, n_boot, seed)
    return (float(x.mean()), *_percentile_interval(means, alpha))


def paired_bootstrap_diff(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                          n_boot: int = 2000, alpha: float = 0.05,
                          seed: int = 0) -> tuple[float, float, float]:
    """(diff, lo, hi) for mean(a) − mean(b), where a[i] and b[i] are outcomes on the same example i.

    Resampling index i picks the pair (a[i], b[i]); the mean of the resampled a minus the mean of the
    resampled b equals the mean of the resampled per-example differences, so we bootstrap those.
    """
    x, y = _as_outcomes(a, "a"), _as_outcomes(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired arrays differ in length ({x.size} vs {y.size}): they must cover the same examples")
    d = x - y
    means = _bootstrap_means(d, n_boot, seed)
    return (float(d.mean()), *_percentile_interval(means, alpha))


def distinct_ngram_ratio(tokens: str | Sequence[int] | np.ndarray, n: int = 3) -> float:
    """Distinct n-grams / all n-grams (1.0 = no repeated n-gram; low = repetitive text).

    A string is split on whitespace; a sequence of token ids is used as is. A text shorter than n
    tokens cannot repeat an n-gram and counts as 1.0.
    """
    seq = tokens.split() if isinstance(tokens, str) else [int(t) for t in tokens]
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


# ----------------------------------------------------------------------------- clustered (failure evaluation)

def _cluster_sums(x: np.ndarray, clusters: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(per-cluster sum of x, per-cluster count), clusters in first-seen order."""
    labels = np.asarray([str(c) for c in clusters])
    if labels.shape != x.shape:
        raise ValueError(f"clusters ({labels.size}) and values ({x.size}) differ in length")
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    sums, counts = np.bincount(inverse, weights=x), np.bincount(inverse).astype(float)
    order = np.argsort(first)
    return sums[order], counts[order]


def cluster_bootstrap_mean(values: Sequence[float] | np.ndarray, clusters: Sequence, n_boot: int = 2000,
                           alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean over all units and its percentile CI from resampling whole clusters
    (a resample's mean = its units' sum / its units' count)."""
    x = _as_outcomes(values)
    sums, counts = _cluster_sums(x, clusters)
    rng = np.random.default_rng(seed)
    c = sums.size
    rows = max(1, MAX_INDEX_CELLS // c)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        idx = rng.integers(0, c, size=(stop - start, c))       # [chunk, clusters]
        means[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return (float(x.mean()), *_percentile_interval(means, alpha))


def paired_cluster_bootstrap_diff(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                                  clusters: Sequence, n_boot: int = 2000, alpha: float = 0.05,
                                  seed: int = 0) -> tuple[float, float, float]:
    """(diff, lo, hi) for mean(a) − mean(b), a[i] and b[i] on the same unit i, resampling clusters."""
    x, y = _as_outcomes(a, "a"), _as_outcomes(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired arrays differ in length ({x.size} vs {y.size}): they must cover the same units")
    return cluster_bootstrap_mean(x - y, clusters, n_boot, alpha, seed)


def clustered_se(values: Sequence[float] | np.ndarray, clusters: Sequence) -> float:
    """Cluster-robust standard error of the mean of `values` (CR1): with cluster sums S_c, counts N_c,
    mean m and C clusters, SE² = C/(C−1) · Σ_c (S_c − m·N_c)² / (Σ_c N_c)². With one unit per cluster
    it is the usual s/√n (s with ddof = 1). NaN with fewer than two clusters."""
    x = _as_outcomes(values)
    sums, counts = _cluster_sums(x, clusters)
    c = sums.size
    if c < 2:
        return float("nan")
    m = sums.sum() / counts.sum()
    return float(np.sqrt(c / (c - 1) * np.sum((sums - m * counts) ** 2)) / counts.sum())


def z_quantile(p: float) -> float:
    return NormalDist().inv_cdf(p)


def min_detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The true effect a two-sided level-α test detects with probability `power`, given the SE of the
    estimate: (z_{1−α/2} + z_{power}) · SE (≈ 2.80 · SE at α = 0.05, 80% power)."""
    return (z_quantile(1 - alpha / 2) + z_quantile(power)) * float(se)


# ----------------------------------------------------------------------------- NaN-aware summaries

def paired_delta(a: Sequence[float], b: Sequence[float], clusters: Sequence, n_boot: int,
                 seed: int) -> dict:
    """mean(a − b) over the failures scorable in both, its CI (queries resampled), the cluster-robust
    SE and the minimum detectable effect at 80% power from that SE."""
    a, b, clusters = np.asarray(a, float), np.asarray(b, float), np.asarray(clusters)
    keep = ~(np.isnan(a) | np.isnan(b))
    if not keep.any():
        return {"delta": None, "ci": [None, None], "se": None, "mde": None, "n": 0}
    d, lo, hi = paired_cluster_bootstrap_diff(a[keep], b[keep], clusters[keep], n_boot=n_boot, seed=seed)
    se = clustered_se(a[keep] - b[keep], clusters[keep])
    return {"delta": d, "ci": [lo, hi], "se": se, "mde": min_detectable_effect(se), "n": int(keep.sum())}


def clustered_rate(values: Sequence[float], clusters: Sequence, n_boot: int, seed: int) -> dict:
    """Mean of the non-NaN `values` (NaN = unscorable), its cluster-bootstrap CI, SE and count."""
    x, c = np.asarray(values, float), np.asarray(clusters)
    keep = ~np.isnan(x)
    if not keep.any():
        return {"mean": None, "ci": [None, None], "se": None, "n": 0}
    mean, lo, hi = cluster_bootstrap_mean(x[keep], c[keep], n_boot=n_boot, seed=seed)
    return {"mean": mean, "ci": [lo, hi], "se": clustered_se(x[keep], c[keep]), "n": int(keep.sum())}
