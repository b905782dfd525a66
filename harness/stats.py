"""Statistics, in one place: the checks of samples against an analytic distribution (moments,
support, Kolmogorov-Smirnov), exact comparisons, and summaries.

Thresholds come from one significance level, ALPHA, per test: a correct initializer fails a
given test with probability about ALPHA, while a wrong scale, fan or layout on a large weight
moves the statistic many standard errors and fails. Moment tests use z(ALPHA) standard errors
(the mean from the distribution's variance, the variance from its fourth moment) and run only
where n is large enough for the normal approximation; the Kolmogorov-Smirnov test is exact at
any n. scipy is imported on first use only (``harness list`` and ``setup`` never need it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

ALPHA = 1e-6
Z = NormalDist().inv_cdf(1 - ALPHA / 2)  # ~4.89 standard errors
MIN_N_MEAN = 30                          # CLT for the mean of a light-tailed distribution
MIN_N_VAR = 256                          # ... and for the sample variance

# check names, shared by the analysis that makes them and the report that reads them
MEAN, STD, BOUNDS, KS, EXACT = "mean", "std", "bounds", "ks", "exact"


@dataclass
class Check:
    """One test: what was observed, what was expected, and whether they agree. ``subject``
    qualifies a test of part of a sample (``nonzero``: the nonzero values)."""
    name: str
    passed: bool
    observed: Any
    expected: Any
    detail: str = ""
    subject: str = ""
    #: a failed check that a backend.yaml declaration explains (a known framework limitation
    #: or defect): what it says, in one line; such a failure is a finding, not a failure
    known: str | None = None
    #: a comparison that says nothing about the framework, measured so, and judged another
    #: way (an ill-conditioned gradient, judged in inference mode): why, in one line; its
    #: ``passed`` is what the comparison gave, not a verdict
    unjudged: str | None = None

    @property
    def label(self) -> str:
        return f"{self.subject}_{self.name}" if self.subject else self.name

    @property
    def holds(self) -> bool:
        """Passed, or failed as a declared known limitation or defect says it must, or failed
        where the comparison was measured to be meaningless (``unjudged``)."""
        return self.passed or self.known is not None or self.unjudged is not None

    @property
    def verdict(self) -> str:
        return "not judged" if self.unjudged else "pass" if self.passed else "FAIL"

    def to_json(self) -> dict:
        out = {"check": self.label, "passed": bool(self.passed), "observed": self.observed,
               "expected": self.expected, "detail": self.detail}
        if self.known is not None:
            out["known"] = self.known
        if self.unjudged is not None:
            out["unjudged"] = self.unjudged
        return out


def scipy_stats():
    """``scipy.stats``, imported when first needed (it costs about a second)."""
    from scipy import stats
    return stats


def f32(x: float) -> float:
    return float(np.float32(x))


def summarize(values) -> dict:
    """n, mean, std (ddof 1), min, max, the fraction of exact zeros, and the kurtosis (the
    fourth central moment over the squared variance: the standard error of a variance, which
    ``harness diff`` needs to tell whether a parameter's spread moved between two runs)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"n": 0}
    centred = v - v.mean()
    m2 = float(np.mean(centred ** 2))
    return {"n": int(v.size), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "zero_fraction": float(np.mean(v == 0)),
            "kurtosis": float(np.mean(centred ** 4)) / m2 ** 2 if m2 > 0 else None}


def continuous_checks(v: np.ndarray, dist, support=(None, None), subject: str = "") -> list[Check]:
    """Moments, bounds and a KS test of samples ``v`` against a frozen scipy distribution."""
    out, n = [], v.size
    mean, var = float(dist.mean()), float(dist.var())
    if n >= MIN_N_MEAN:
        tol = Z * math.sqrt(var / n) + 1e-7 * (abs(mean) + 1)
        out.append(Check(MEAN, abs(v.mean() - mean) <= tol, float(v.mean()), mean,
                         f"|mean - {mean:.4g}| <= {tol:.3g}", subject))
    if n >= MIN_N_VAR and var > 0:
        mu4 = (float(dist.stats(moments="k")) + 3) * var ** 2
        tol = Z * math.sqrt((mu4 - var ** 2) / n)
        s2 = float(v.var(ddof=1))
        out.append(Check(STD, abs(s2 - var) <= tol, math.sqrt(s2), math.sqrt(var),
                         f"|var - {var:.4g}| <= {tol:.3g}", subject))
    lo, hi = support
    if lo is not None and n:
        outside = outside_support(v, lo, hi)
        out.append(Check(BOUNDS, not outside, [float(v.min()), float(v.max())], [lo, hi],
                         "every value inside the support" if not outside else
                         f"{outside:,} of {n:,} values outside the support", subject))
    if n >= 2:
        p = ks_pvalue(v, dist)
        out.append(Check(KS, p >= ALPHA, p, ALPHA, f"Kolmogorov-Smirnov p-value >= {ALPHA:g}",
                         subject))
    return out


def outside_support(v: np.ndarray, lo: float, hi: float) -> int:
    """How many values lie outside [lo, hi] (the bounds as float32, with a float32 rounding
    margin): the bounds check's count, kept so a known defect can be told by its rate."""
    v = np.asarray(v, dtype=np.float64)
    return int(np.count_nonzero((v < f32(lo) - 1e-7 * abs(lo)) | (v > f32(hi) + 1e-7 * abs(hi))))


def ks_pvalue(v: np.ndarray, dist) -> float:
    """The one-sample two-sided Kolmogorov-Smirnov test of ``v`` against ``dist``: the
    statistic D = sup |F_n - F| from one sort, its p-value from the exact distribution of D
    (scipy.stats.kstwo, which falls back to the asymptotic one for large n); the same test as
    scipy.stats.kstest with half its sorting."""
    x = np.sort(np.asarray(v, dtype=np.float64))
    n = x.size
    cdf = dist.cdf(x)
    i = np.arange(1, n + 1)
    d = max(float(np.max(i / n - cdf)), float(np.max(cdf - (i - 1) / n)))
    return float(scipy_stats().kstwo.sf(d, n))


def exact_check(values: np.ndarray, target, detail: str, name: str = EXACT) -> Check:
    """Every value equal to ``target`` (an array or a scalar)."""
    diff = float(np.max(np.abs(values - target))) if values.size else 0.0
    return Check(name, diff == 0.0, diff, 0.0, detail)


# ----------------------------------------------------------------------------- timing statistics

SPREAD_WARNING = 0.10   # IQR / median above this: the figure is noisy (torch.utils.benchmark's)
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class TimingStats:
    """Per-call seconds from raw block times, as ``torch.utils.benchmark.Measurement``
    derives them: each block's time divided by its calls, then order statistics; plus a
    bootstrap 95 % confidence interval of the median."""
    n_blocks: int
    number: int
    median: float
    q1: float
    q3: float
    p10: float
    p90: float
    ci_low: float
    ci_high: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """IQR / median."""
        return self.iqr / self.median if self.median > 0 else math.inf

    @property
    def noisy(self) -> bool:
        return self.spread > SPREAD_WARNING

    def to_json(self) -> dict:
        return {"n_blocks": self.n_blocks, "number": self.number, "median_s": self.median,
                "iqr_s": self.iqr, "q1_s": self.q1, "q3_s": self.q3, "p10_s": self.p10,
                "p90_s": self.p90,
                "ci95_median_s": [self.ci_low, self.ci_high], "spread": self.spread,
                "noisy": self.noisy}


def timing_stats(block_times, number: int, seed: int = 0) -> TimingStats | None:
    """Statistics of per-call times; None without a usable sample."""
    times = np.asarray(block_times, dtype=np.float64) / max(int(number), 1)
    times = times[np.isfinite(times) & (times > 0)]
    if times.size == 0:
        return None
    p10, q1, median, q3, p90 = np.percentile(times, [10, 25, 50, 75, 90])
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(times, size=(BOOTSTRAP_RESAMPLES, times.size)), axis=1)
    lo, hi = np.percentile(medians, [2.5, 97.5])
    return TimingStats(int(times.size), int(number), float(median), float(q1), float(q3),
                       float(p10), float(p90), float(lo), float(hi))
