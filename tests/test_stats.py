import numpy as np
import pytest

from rrr import stats
from rrr.stats import (bootstrap_ci, cluster_bootstrap_mean, clustered_se, distinct_ngram_ratio,
                       min_detectable_effect, paired_bootstrap_diff, paired_cluster_bootstrap_diff, z_quantile)


def test_all_ones_and_all_zeros_have_degenerate_intervals():
    assert bootstrap_ci(np.ones(50, dtype=bool)) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([False] * 7) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_diff([1, 1, 0], [1, 1, 0]) == (0.0, 0.0, 0.0)


def test_ci_contains_mean_and_is_within_bounds():
    rng = np.random.default_rng(1)
    x = rng.random(300) < 0.3
    mean, lo, hi = bootstrap_ci(x)
    assert mean == pytest.approx(x.mean())
    assert 0.0 <= lo < mean < hi <= 1.0
    # a binomial 95% CI half-width is about 1.96 * sqrt(p(1-p)/n)
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(x.mean() * (1 - x.mean()) / x.size), rel=0.15)


def test_ci_shrinks_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (50, 500, 5000):
        _, lo, hi = bootstrap_ci(rng.random(n) < 0.5)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_deterministic_under_seed_and_seed_matters():
    x = np.random.default_rng(3).random(100)  # continuous, so quantiles differ between seeds
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, seed=7)[1:] != bootstrap_ci(x, seed=8)[1:]


def test_chunking_does_not_change_the_result(monkeypatch):
    x = np.random.default_rng(4).random(100) < 0.4
    whole = bootstrap_ci(x, n_boot=500)
    monkeypatch.setattr(stats, "MAX_INDEX_CELLS", 100 * 7)  # 7 resamples per chunk
    assert bootstrap_ci(x, n_boot=500) == whole


def test_paired_ci_is_narrower_than_unpaired_for_correlated_outcomes():
    rng = np.random.default_rng(5)
    n = 400
    vanilla = rng.random(n) < 0.4
    # trained solves what vanilla solves, plus some more: strongly correlated per example
    trained = vanilla | (rng.random(n) < 0.15)
    diff, lo, hi = paired_bootstrap_diff(trained, vanilla)
    assert diff == pytest.approx(trained.mean() - vanilla.mean())
    assert 0 < lo < diff < hi
    boot_t = _resampled_means(trained, seed=1)
    boot_v = _resampled_means(vanilla, seed=2)
    unpaired_lo, unpaired_hi = np.quantile(boot_t - boot_v, [0.025, 0.975])
    assert (hi - lo) < 0.6 * (unpaired_hi - unpaired_lo)


def _resampled_means(x, seed, n_boot=2000):
    rng = np.random.default_rng(seed)
    return np.asarray(x, float)[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)


def test_paired_diff_sign_follows_argument_order():
    a, b = [1, 1, 1, 0], [0, 0, 1, 0]
    assert paired_bootstrap_diff(a, b)[0] == pytest.approx(0.5)
    assert paired_bootstrap_diff(b, a)[0] == pytest.approx(-0.5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, np.nan])
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_diff([1, 0], [1, 0, 1])


def test_distinct_ngram_ratio():
    assert distinct_ngram_ratio("a b c d e") == 1.0
    # "a b a b a b": trigrams aba, bab, aba, bab -> 2 distinct of 4
    assert distinct_ngram_ratio("a b a b a b") == pytest.approx(0.5)
    assert distinct_ngram_ratio([5, 5, 5, 5, 5, 5]) == pytest.approx(1 / 4)
    assert distinct_ngram_ratio(np.array([1, 2, 1, 2]), n=2) == pytest.approx(2 / 3)
    assert distinct_ngram_ratio("too short") == 1.0


# ----------------------------------------------------------------------------- clustered statistics

def test_clustered_se_with_singleton_clusters_is_the_textbook_se():
    x = np.array([0.0, 0.25, 1.0, 0.5, 0.75, 0.0, 1.0])
    assert clustered_se(x, range(len(x))) == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)))


def test_clustered_se_closed_form_two_clusters():
    # clusters A = [1, 1] (S=2, N=2) and B = [0] (S=0, N=1): m = 2/3, residual sums 2-4/3 = 2/3 and -2/3,
    # SE² = 2/1 · (4/9 + 4/9) / 9 = 16/81
    assert clustered_se([1.0, 1.0, 0.0], ["A", "A", "B"]) == pytest.approx(4 / 9)
    assert np.isnan(clustered_se([1.0, 0.0], ["A", "A"]))            # one cluster: no variance estimate


def test_clustering_widens_the_se_when_units_of_a_cluster_agree():
    x = np.repeat([0.0, 1.0, 0.0, 1.0, 1.0, 0.0], 4)                  # 6 queries × 4 identical failures
    clusters = np.repeat(list("abcdef"), 4)
    assert clustered_se(x, clusters) == pytest.approx(clustered_se(x[::4], list("abcdef")))
    assert clustered_se(x, clusters) > 1.9 * clustered_se(x, range(x.size))


def test_cluster_bootstrap_resamples_whole_clusters():
    x = np.repeat([0.0, 1.0], [9, 1])            # cluster a: nine zeros; cluster b: one 1
    mean, lo, hi = cluster_bootstrap_mean(x, ["a"] * 9 + ["b"], n_boot=500, seed=0)
    assert mean == pytest.approx(0.1)
    # a resample is {a,a} (mean 0), {b,b} (mean 1) or {a,b} (0.1): only those values can be bounds
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    m2, lo2, hi2 = cluster_bootstrap_mean(x, range(10), n_boot=500, seed=0)
    assert hi2 < 0.5                              # unclustered: far narrower, wrongly


def test_cluster_bootstrap_se_agrees_with_the_clustered_se():
    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(60), 3)
    x = rng.random(60).repeat(3) + 0.1 * rng.standard_normal(180)
    _, lo, hi = cluster_bootstrap_mean(x, clusters, n_boot=4000, seed=2)
    assert (hi - lo) / (2 * 1.96) == pytest.approx(clustered_se(x, clusters), rel=0.12)


def test_paired_cluster_diff_and_its_order():
    a, b = [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]
    d, lo, hi = paired_cluster_bootstrap_diff(a, b, ["q1", "q1", "q2", "q3"], n_boot=300)
    assert d == pytest.approx(0.5) and lo <= d <= hi
    assert paired_cluster_bootstrap_diff(b, a, ["q1", "q1", "q2", "q3"], n_boot=300)[0] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="length"):
        paired_cluster_bootstrap_diff(a, b[:3], ["q1"] * 3)
    with pytest.raises(ValueError, match="length"):
        cluster_bootstrap_mean(a, ["q1"] * 3)


def test_min_detectable_effect_is_z_sum_times_se():
    assert z_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert z_quantile(0.8) == pytest.approx(0.841621, abs=1e-6)
    assert min_detectable_effect(1.0) == pytest.approx(2.801585, abs=1e-6)
    assert min_detectable_effect(0.02) == pytest.approx(0.0560317, abs=1e-6)
    assert min_detectable_effect(0.02, power=0.9) == pytest.approx(0.02 * (1.959964 + 1.281552), abs=1e-6)
    assert min_detectable_effect(0.02, alpha=0.1) == pytest.approx(0.02 * (1.644854 + 0.841621), abs=1e-6)


def test_paired_delta_and_clustered_rate_leave_unscorable_units_out():
    from rrr.stats import clustered_rate, paired_delta

    a, b = [1.0, 0.5, np.nan, 0.0], [0.0, 0.5, 1.0, np.nan]
    d = paired_delta(a, b, ["x", "y", "z", "w"], n_boot=200, seed=0)
    assert (d["delta"], d["n"]) == (0.5, 2)
    assert d["se"] == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))
    assert d["mde"] == pytest.approx(min_detectable_effect(d["se"]))
    r = clustered_rate(a, ["x", "x", "z", "w"], n_boot=200, seed=0)
    assert (r["mean"], r["n"]) == (0.5, 3)
    assert paired_delta([np.nan], [0.0], ["x"], 10, 0)["n"] == 0
    assert clustered_rate([np.nan], ["x"], 10, 0)["mean"] is None
