"""Agreement statistics on textbook examples and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bone3d.errors import InputError
from bone3d.evaluation.stats import (
    agreement,
    bland_altman,
    compare_methods,
    error_pairs,
    fisher_z,
    icc,
    kendalls_w,
    relative_errors,
    steiger_z,
)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float
)


def test_icc_matches_shrout_fleiss_two_raters():
    """With two judges, ICC(2,1)/(3,1) follow from the two-way ANOVA mean squares (closed form)."""
    x, y = SHROUT_FLEISS[:, 0], SHROUT_FLEISS[:, 2]
    data = np.stack([x, y], 1)
    n, k = data.shape
    grand = data.mean()
    msr = k * ((data.mean(1) - grand) ** 2).sum() / (n - 1)
    msc = n * ((data.mean(0) - grand) ** 2).sum() / (k - 1)
    sse = ((data - data.mean(1, keepdims=True) - data.mean(0, keepdims=True) + grand) ** 2).sum()
    mse = sse / ((n - 1) * (k - 1))
    icc21 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    icc31 = (msr - mse) / (msr + (k - 1) * mse)
    assert icc(x, y, "ICC(2,1)")["icc"] == pytest.approx(icc21)
    assert icc(x, y, "ICC(3,1)")["icc"] == pytest.approx(icc31)


def test_icc_published_values_for_four_judges():
    """Shrout & Fleiss report ICC(2,1) = 0.29 and ICC(3,1) = 0.71 for the 4-judge table."""
    import pandas as pd
    import pingouin as pg

    df = pd.DataFrame(
        [(t, j, v) for t, row in enumerate(SHROUT_FLEISS) for j, v in enumerate(row)],
        columns=["t", "j", "v"],
    )
    table = pg.intraclass_corr(df, "t", "j", "v").set_index("Type")
    assert table.loc["ICC(A,1)", "ICC"] == pytest.approx(0.29, abs=0.005)  # Shrout-Fleiss ICC(2,1)
    assert table.loc["ICC(C,1)", "ICC"] == pytest.approx(0.71, abs=0.005)  # ICC(3,1)


def test_agreement_against_scipy_and_closed_forms(rng):
    ref = rng.normal(0.2, 0.05, 20)
    meth = 0.9 * ref + 0.01 + rng.normal(0, 0.01, 20)
    a = agreement(meth, ref)
    assert a["paired_t"]["p"] == pytest.approx(stats.ttest_rel(meth, ref).pvalue)
    assert a["pearson"]["r"] == pytest.approx(np.corrcoef(meth, ref)[0, 1])
    slope, intercept = np.polyfit(ref, meth, 1)
    assert a["regression"]["slope"] == pytest.approx(slope) and a["regression"][
        "intercept"
    ] == pytest.approx(intercept)
    d = meth - ref
    ba = bland_altman(meth, ref)
    assert ba["bias"] == pytest.approx(d.mean())
    assert ba["loa_high"] - ba["loa_low"] == pytest.approx(2 * 1.96 * d.std(ddof=1))


def test_relative_errors_one_near_zero_reference_swamps_the_mean_not_the_normalised_error():
    ref = np.array([1.0, 1.2, 0.8, 0.02])
    close = np.array([0.9, 1.1, 0.7, -0.3])  # near in three, the wrong sign at the near-zero one
    e = relative_errors(close, ref)
    rel = np.abs(close - ref) / ref
    assert e["mean_abs_rel_error"] == pytest.approx(rel.mean()) and e["mean_abs_rel_error"] > 4
    assert e["median_abs_rel_error"] == pytest.approx(np.median(rel))
    assert e["norm_mean_abs_error"] == pytest.approx(0.62 / 3.02)
    assert agreement(close, ref)["norm_mean_abs_error"] == e["norm_mean_abs_error"]
    zero = relative_errors(close, np.array([1.0, 1.2, 0.8, 0.0]))
    assert zero["mean_abs_rel_error"] is None and zero["median_abs_rel_error"] is None
    assert zero["norm_mean_abs_error"] == pytest.approx(0.6 / 3.0)


def test_error_pairs_count_an_undefined_reading_as_a_complete_miss():
    ref = [1.0, None, 0.0, 2.0, 0.5, np.inf]
    method = [1.1, 3.0, 1.0, None, np.nan, 1.0]
    x, y, missed = error_pairs(method, ref)
    # references None, 0 and inf leave their VOIs out; the method's None and NaN read as 0
    assert x.tolist() == [1.1, 0.0, 0.0] and y.tolist() == [1.0, 2.0, 0.5] and missed == 2
    assert np.abs(x - y) / y == pytest.approx([0.1, 1.0, 1.0])
    x, y, missed = error_pairs([0.9, 1.2], [1.0, 1.0])
    assert missed == 0 and x.tolist() == [0.9, 1.2]
    with pytest.raises(InputError, match="one length"):
        error_pairs([1.0, 2.0], [1.0])


def test_fisher_and_steiger_z():
    z = fisher_z(0.9, 30, 0.7, 30)
    expected = (math.atanh(0.9) - math.atanh(0.7)) / math.sqrt(2 / 27)
    assert z["z"] == pytest.approx(expected)
    assert z["p"] == pytest.approx(2 * stats.norm.sf(expected))
    assert steiger_z(0.8, 0.8, 0.5, 40)["z"] == pytest.approx(0.0)
    assert steiger_z(0.9, 0.6, 0.5, 40)["p"] < 0.05


def test_kendalls_w_closed_forms():
    perfect = np.tile(np.arange(1, 6), (4, 1))
    assert kendalls_w(perfect)["w"] == pytest.approx(1.0)
    # W relates to Friedman's chi-square: chi2_F = m (n - 1) W (no ties)
    rng = np.random.default_rng(3)
    ratings = np.vstack([rng.permutation(6) + 1 for _ in range(5)])
    w = kendalls_w(ratings)
    friedman = stats.friedmanchisquare(*ratings.T)
    assert w["chi2"] == pytest.approx(friedman.statistic)
    assert w["p"] == pytest.approx(friedman.pvalue)
    # with ties: the tie-corrected W still equals Friedman's tie-corrected statistic / (m (n-1))
    tied = np.array([[1, 2, 2, 3], [1, 1, 2, 3], [2, 1, 3, 3]], float)
    f2 = stats.friedmanchisquare(*tied.T)
    assert kendalls_w(tied)["w"] == pytest.approx(f2.statistic / (3 * 3))


def test_compare_methods_paired_and_independent(rng):
    hr = rng.normal(0.2, 0.05, 12)
    table = {
        "lr": hr + 0.05 + rng.normal(0, 0.005, 12),
        "sr": hr + rng.normal(0, 0.005, 12),
        "hr": hr,
    }
    paired = compare_methods(table)
    assert paired["friedman"]["p"] < 0.01
    by = {(p["a"], p["b"]): p for p in paired["posthoc"]}
    assert (
        by[("lr", "hr")]["p_holm"] < 0.05
        and by[("sr", "hr")]["p_holm"] > by[("lr", "hr")]["p_holm"]
    )
    ind = compare_methods(table, paired=False)
    assert ind["kruskal_wallis"]["p"] == pytest.approx(stats.kruskal(*table.values()).pvalue)
