"""How sure a difference between two arms is: tests paired by seed, Holm's correction across arms,
and the seeds a difference of the observed size would need.

Runs of one seed see the same data order and start from the same weights wherever the arms share
a shape, so an arm's run and the baseline's of the same seed make a pair, and the paired
differences carry less of the seed's luck than two independent samples do. Where the two arms do
not share their seeds, Welch's test stands in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05  # the level the confidence intervals, Holm and the seed count are stated at
POWER = 0.8  # the chance the counted seeds give p < ALPHA if the true difference is the observed one
MAX_SEEDS = 1000


@dataclass
class Delta:
    delta: float  # arm mean - baseline mean
    ci_low: float  # 95% confidence interval of the delta (nan with fewer than 2 seeds a side)
    ci_high: float
    p_value: float  # two-sided: the paired t-test, or Welch's where the seeds differ
    test: str = "Welch"  # "paired t" or "Welch"
    wilcoxon_p: float = math.nan  # the signed-rank test of the paired differences (no normality assumed)
    p_holm: float = math.nan  # p_value adjusted by Holm over the arms compared on this metric
    seeds_needed: int | None = None  # seeds for p < ALPHA at POWER, were the true delta this one


def welch(a: list[float], b: list[float]) -> Delta:
    """The difference of the means of two independent samples, with Welch's interval and test."""
    delta = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return Delta(delta, math.nan, math.nan, math.nan)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Delta(delta, delta, delta, math.nan)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(1 - ALPHA / 2, dof)) * se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    pooled_sd = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    needed = seeds_needed(delta, pooled_sd, paired=False)
    return Delta(delta, delta - half, delta + half, p, seeds_needed=needed)


def paired(a: list[float], b: list[float]) -> Delta:
    """The mean of the seed-by-seed differences ``a[i] - b[i]``, with the paired t interval and
    test, and Wilcoxon's signed-rank test of the same differences."""
    diffs = np.subtract(a, b)
    delta = float(diffs.mean())
    if len(diffs) < 2:
        return Delta(delta, math.nan, math.nan, math.nan, "paired t")
    sd = float(diffs.std(ddof=1))
    if sd == 0:
        return Delta(delta, delta, delta, math.nan, "paired t")
    half = float(stats.t.ppf(1 - ALPHA / 2, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    p = float(stats.ttest_rel(a, b).pvalue)
    wilcoxon = float(stats.wilcoxon(a, b).pvalue) if np.any(diffs != 0) else math.nan
    return Delta(
        delta, delta - half, delta + half, p, "paired t", wilcoxon, seeds_needed=seeds_needed(delta, sd)
    )


def compare_by_seed(arm: dict[int, float], base: dict[int, float]) -> Delta:
    """Paired where the two share their seeds (at least two), else Welch's."""
    if set(arm) == set(base) and len(arm) >= 2:
        seeds = sorted(arm)
        return paired([arm[s] for s in seeds], [base[s] for s in seeds])
    return welch(list(arm.values()), list(base.values()))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaNs are left out of the family and
    stay NaN): the adjusted p of the k-th smallest of m is max over j <= k of (m - j + 1) p_(j)."""
    order = [i for i in np.argsort(p_values) if not math.isnan(p_values[i])]
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def seeds_needed(delta: float, sd: float, paired: bool = True) -> int | None:
    """The fewest seeds per arm at which a two-sided t-test at ``ALPHA`` has ``POWER`` to find a
    true difference of ``delta``, given a spread ``sd`` (of the paired differences, or of one arm's
    runs): None where there is no difference or no spread to say it with, MAX_SEEDS past that."""
    if delta == 0 or not math.isfinite(delta) or not math.isfinite(sd) or sd == 0:
        return None
    effect = abs(delta) / sd
    for n in range(2, MAX_SEEDS):
        dof = n - 1 if paired else 2 * n - 2
        shift = effect * math.sqrt(n if paired else n / 2)
        crit = stats.t.ppf(1 - ALPHA / 2, dof)
        power = stats.nct.sf(crit, dof, shift) + stats.nct.cdf(-crit, dof, shift)
        if power >= POWER:
            return n
    return MAX_SEEDS
