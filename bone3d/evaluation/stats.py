"""Agreement and comparison statistics for morphometry and image metrics.

The tests the SR/morphometry studies report, each from scipy.stats or pingouin where they exist:

* `agreement(method, reference)`: mean +- SD of both, bias, paired t-test (scipy ``ttest_rel``),
  Pearson R, R^2 and p (``pearsonr``), linear regression slope/intercept (``linregress``),
  ICC in a named Shrout & Fleiss (1979) form (pingouin ``intraclass_corr``: ICC(2,1) = two-way
  random, absolute agreement, McGraw & Wong's ICC(A,1); ICC(3,1) = two-way mixed, consistency,
  ICC(C,1)), and
  Bland & Altman (1986) bias with 95 % limits of agreement (bias +- 1.96 SD of the differences).
* `relative_errors(method, reference)`: the mean absolute relative error (the SR-morphometry
  studies' "error vs HR"), its median, and the normalised mean absolute error sum |x - y| /
  sum |y| (the error in units of the reference's mean; also called WAPE), which a reference
  near zero in one specimen cannot swamp as it can the mean of ratios.
* `error_pairs(method, reference)`: the pairs a method's error across sub-VOIs is taken over,
  with a method's undefined reading (no bone to measure) counted as a complete miss.
* `compare_methods(table)`: Kruskal-Wallis (independent groups) and Friedman (repeated measures
  on the same specimens) omnibus tests, with pairwise Wilcoxon signed-rank / Mann-Whitney U
  post-hoc tests, Holm-corrected.
* `fisher_z(r1, n1, r2, n2)`: difference between two independent correlations (Fisher 1921); for
  two methods measured on the same specimens against the same reference use `steiger_z`
  (Steiger 1980, dependent correlations sharing one variable).
* `kendalls_w(ratings)`: Kendall's coefficient of concordance W for m raters x n items, with the
  tie correction, and its chi-square test (chi2 = m (n - 1) W, n - 1 df) (Kendall & Babington
  Smith 1939). Hand-written: neither scipy nor pingouin offers W.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pingouin as pg
from scipy import stats

from bone3d.errors import InputError


def _pair(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(name, f"need two 1D arrays of equal length, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        raise InputError(name, "fewer than 3 finite pairs")
    return x[ok], y[ok]


# Shrout & Fleiss (1979) names -> McGraw & Wong (1996) rows of pingouin's table
ICC_FORMS = {
    "ICC(1,1)": ("ICC(1,1)", "one-way random, single rater"),
    "ICC(2,1)": ("ICC(A,1)", "two-way random, absolute agreement, single rater"),
    "ICC(3,1)": ("ICC(C,1)", "two-way mixed, consistency, single rater"),
}


def icc(method, reference, form: str = "ICC(2,1)") -> dict:
    """Intraclass correlation between two raters (method, reference) over targets (pingouin)."""
    if form not in ICC_FORMS:
        raise InputError("icc", f"form must be one of {sorted(ICC_FORMS)}, got {form!r}")
    x, y = _pair(method, reference, "icc")
    n = len(x)
    df = pd.DataFrame(
        {
            "target": np.tile(np.arange(n), 2),
            "rater": np.repeat(["method", "reference"], n),
            "value": np.concatenate([x, y]),
        }
    )
    table = pg.intraclass_corr(data=df, targets="target", raters="rater", ratings="value")
    label, description = ICC_FORMS[form]
    row = table.set_index("Type").loc[label]
    ci = row["CI95"] if "CI95" in row.index else row["CI95%"]
    return {
        "form": form,
        "mcgraw_wong": label,
        "description": description,
        "icc": float(row["ICC"]),
        "ci95": [float(v) for v in ci],
        "p": float(row["pval"]),
    }


def bland_altman(method, reference) -> dict:
    """Bias (method - reference) and 95 % limits of agreement (bias +- 1.96 SD, ddof 1)."""
    x, y = _pair(method, reference, "bland_altman")
    d = x - y
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return {
        "bias": bias,
        "sd": sd,
        "loa_low": bias - 1.96 * sd,
        "loa_high": bias + 1.96 * sd,
        "n": int(len(d)),
    }


def relative_errors(method, reference) -> dict:
    """``mean_abs_rel_error`` (mean of |x - y| / |y|), ``median_abs_rel_error`` and
    ``norm_mean_abs_error`` (sum |x - y| / sum |y|) of ``method`` against ``reference``, unitless.
    The first two are None where a reference value is 0 (undefined), the last where all are."""
    x, y = _pair(method, reference, "relative_errors")
    err, ref = np.abs(x - y), np.abs(y)
    defined = bool(np.all(ref != 0))
    return {
        "mean_abs_rel_error": float(np.mean(err / ref)) if defined else None,
        "median_abs_rel_error": float(np.median(err / ref)) if defined else None,
        "norm_mean_abs_error": float(err.sum() / ref.sum()) if ref.sum() > 0 else None,
    }


def error_pairs(method, reference) -> tuple[np.ndarray, np.ndarray, int]:
    """``(x, y, n_missed)``: a method's values ``x`` and the reference's ``y`` over the VOIs
    where a relative error is defined, and how many of them the method missed.

    VOIs whose reference is undefined (None, NaN, inf) or 0 are left out: |x - y| / |y| needs a
    reference. Where the reference is defined but the method's value is not (None, NaN, inf:
    it segmented no bone in that VOI, or too little to measure Tb.Th or a fabric tensor), the
    value is read as 0, a complete miss with relative error 1 (100 %), the error its BV/TV of 0
    (always defined) has there. Leaving such VOIs out instead would excuse a method exactly
    where it fails and score methods over different VOIs. The rule is ours (BoneJ reports NaN
    for such a mask and leaves the choice to the study); ``n_missed`` says how often it acted.
    """
    x = np.array([np.nan if v is None else v for v in np.ravel(method)], dtype=float)
    y = np.array([np.nan if v is None else v for v in np.ravel(reference)], dtype=float)
    if x.shape != y.shape:
        raise InputError(
            "error_pairs", f"need two arrays of one length, got {x.shape} and {y.shape}"
        )
    keep = np.isfinite(y) & (y != 0)
    x, y = x[keep], y[keep]
    missed = ~np.isfinite(x)
    return np.where(missed, 0.0, x), y, int(missed.sum())


def agreement(method, reference, *, icc_form: str = "ICC(2,1)") -> dict:
    """Every agreement figure between ``method`` and ``reference`` over specimens/VOIs."""
    x, y = _pair(method, reference, "agreement")
    t = stats.ttest_rel(x, y)
    r = stats.pearsonr(x, y)
    lr = stats.linregress(y, x)  # method as a function of the reference
    return {
        "n": int(len(x)),
        "method_mean": float(x.mean()),
        "method_sd": float(x.std(ddof=1)),
        "reference_mean": float(y.mean()),
        "reference_sd": float(y.std(ddof=1)),
        "bias": float((x - y).mean()),
        **relative_errors(x, y),
        "paired_t": {"t": float(t.statistic), "p": float(t.pvalue)},
        "pearson": {"r": float(r.statistic), "r2": float(r.statistic**2), "p": float(r.pvalue)},
        "regression": {
            "slope": float(lr.slope),
            "intercept": float(lr.intercept),
            "r2": float(lr.rvalue**2),
        },
        "icc": icc(x, y, icc_form),
        "bland_altman": bland_altman(x, y),
    }


def fisher_z(r1: float, n1: int, r2: float, n2: int) -> dict:
    """Two-sided test of r1 == r2 for correlations from independent samples."""
    if min(n1, n2) < 4:
        raise InputError("fisher_z", "each correlation needs n >= 4")
    z = (math.atanh(r1) - math.atanh(r2)) / math.sqrt(1.0 / (n1 - 3) + 1.0 / (n2 - 3))
    return {"z": z, "p": float(2 * stats.norm.sf(abs(z)))}


def steiger_z(r_a_ref: float, r_b_ref: float, r_a_b: float, n: int) -> dict:
    """Steiger's (1980) Z for two dependent correlations sharing the reference (eq. 15, pooled)."""
    if n < 4:
        raise InputError("steiger_z", "needs n >= 4")
    z1, z2 = math.atanh(r_a_ref), math.atanh(r_b_ref)
    rbar = (r_a_ref + r_b_ref) / 2.0
    psi = r_a_b * (1 - 2 * rbar**2) - 0.5 * rbar**2 * (1 - 2 * rbar**2 - r_a_b**2)
    c = psi / (1 - rbar**2) ** 2
    z = (z1 - z2) * math.sqrt((n - 3) / (2 - 2 * c))
    return {"z": z, "p": float(2 * stats.norm.sf(abs(z)))}


def compare_methods(table: dict[str, np.ndarray], *, paired: bool = True) -> dict:
    """Omnibus and Holm-corrected pairwise tests across methods (same specimens if ``paired``)."""
    names = list(table)
    data = [np.asarray(table[k], float) for k in names]
    if len(names) < 2:
        raise InputError("compare_methods", "need at least two methods")
    out: dict = {"methods": names, "paired": paired}
    if paired:
        if len({len(d) for d in data}) != 1:
            raise InputError(
                "compare_methods", "paired comparison needs the same specimens for every method"
            )
        if len(names) >= 3:
            f = stats.friedmanchisquare(*data)
            out["friedman"] = {"chi2": float(f.statistic), "p": float(f.pvalue)}
    else:
        k = stats.kruskal(*data)
        out["kruskal_wallis"] = {"h": float(k.statistic), "p": float(k.pvalue)}
    pairs = list(itertools.combinations(range(len(names)), 2))
    raw = []
    for i, j in pairs:
        res = (
            stats.wilcoxon(data[i], data[j])
            if paired
            else stats.mannwhitneyu(data[i], data[j], alternative="two-sided")
        )
        raw.append((names[i], names[j], float(res.statistic), float(res.pvalue)))
    reject, p_holm = pg.multicomp([r[3] for r in raw], method="holm")
    out["posthoc"] = [
        {
            "a": a,
            "b": b,
            "test": "wilcoxon" if paired else "mann-whitney-u",
            "stat": s,
            "p": p,
            "p_holm": float(ph),
        }
        for (a, b, s, p), ph in zip(raw, p_holm, strict=True)
    ]
    return out


def kendalls_w(ratings) -> dict:
    """Kendall's W for ``ratings`` of shape (m raters, n items), ties corrected; chi-square test."""
    r = np.asarray(ratings, dtype=float)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise InputError("kendalls_w", f"need (raters, items) with >= 2 of each, got {r.shape}")
    m, n = r.shape
    ranks = np.vstack([stats.rankdata(row) for row in r])
    rsum = ranks.sum(axis=0)
    s = float(((rsum - rsum.mean()) ** 2).sum())
    ties = 0.0
    for row in r:
        _, counts = np.unique(row, return_counts=True)
        ties += float((counts**3 - counts).sum())
    denom = m**2 * (n**3 - n) - m * ties
    w = 12.0 * s / denom if denom > 0 else float("nan")
    chi2 = m * (n - 1) * w
    return {
        "w": w,
        "chi2": chi2,
        "df": n - 1,
        "p": float(stats.chi2.sf(chi2, n - 1)),
        "raters": m,
        "items": n,
    }
