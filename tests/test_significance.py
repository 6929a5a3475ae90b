"""The comparison's statistics against scipy and against simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from research import metrics as M
from research.experiments.compare import RunRecord, summarise
from research.experiments.significance import ALPHA, POWER, compare_by_seed, holm, paired, seeds_needed, welch

A = [1.531, 1.548, 1.522, 1.560, 1.537]
B = [1.540, 1.561, 1.529, 1.575, 1.541]


def test_the_paired_test_and_wilcoxon_match_scipy():
    d = paired(A, B)
    diffs = np.subtract(A, B)
    half = stats.t.ppf(0.975, len(A) - 1) * diffs.std(ddof=1) / math.sqrt(len(A))
    assert d.test == "paired t"
    assert d.delta == pytest.approx(diffs.mean())
    assert (d.ci_low, d.ci_high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert d.p_value == pytest.approx(stats.ttest_rel(A, B).pvalue)
    assert d.wilcoxon_p == pytest.approx(stats.wilcoxon(A, B).pvalue)
    # the pairs carry the seeds' shared luck: paired, this difference is clear; unpaired, it is not
    assert d.p_value < 0.01 < welch(A, B).p_value


def test_seeds_pair_only_where_both_arms_have_the_same_ones():
    assert compare_by_seed(dict(enumerate(A)), dict(enumerate(B))).test == "paired t"
    unpaired = compare_by_seed(dict(enumerate(A)), {s + 10: v for s, v in enumerate(B)})
    assert unpaired.test == "Welch"
    assert unpaired.p_value == pytest.approx(stats.ttest_ind(A, B, equal_var=False).pvalue)


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, each at least the one before
    assert holm(p)[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm(p)[4])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # capped at one


def test_the_seeds_needed_give_the_stated_power_in_simulation():
    """At the counted seeds, repeated experiments with that true difference reach p < 0.05 about
    80% of the time; one seed fewer, less often."""
    rng = np.random.default_rng(0)
    delta, sd = 0.01, 0.015
    n = seeds_needed(delta, sd)
    assert n is not None and 3 <= n <= 50

    def power(k: int) -> float:
        diffs = rng.normal(delta, sd, size=(4000, k))
        return float(np.mean(stats.ttest_1samp(diffs, 0, axis=1).pvalue < ALPHA))

    assert power(n) == pytest.approx(POWER, abs=0.04) and power(n) >= POWER - 0.02
    assert power(n - 1) < POWER
    assert seeds_needed(0.0, sd) is None and seeds_needed(delta, 0.0) is None
    assert seeds_needed(delta, sd, paired=False) > n  # independent samples need more


def run(arm: str, seed: int, bpb: float, size: str = "") -> RunRecord:
    return RunRecord(f"{arm}{size}{seed}", "e", arm, seed, "FINISHED", "", {M.VAL_BPB: bpb}, size=size)


def test_the_summary_pairs_by_seed_applies_holm_over_the_arms_and_compares_each_size_with_its_own():
    runs = [run("base", s, v) for s, v in enumerate(B)]
    runs += [run("a", s, v) for s, v in enumerate(A)]
    runs += [run("b", s, v + e) for s, (v, e) in enumerate(zip(B, [4e-3, -1e-3, 3e-3, 0, 2e-3], strict=True))]
    runs += [run("base", s, v - 0.5, "big") for s, v in enumerate(B)]
    runs += [run("a", s, v - 0.5, "big") for s, v in enumerate(A)]
    by_arm = {s.arm: s for s in summarise(runs, (M.VAL_BPB,), "base")}
    assert set(by_arm) == {"base", "a", "b", "base [big]", "a [big]"}
    assert by_arm["base"].is_baseline and by_arm["base [big]"].is_baseline
    a, b = by_arm["a"].deltas[M.VAL_BPB], by_arm["b"].deltas[M.VAL_BPB]
    assert a.p_value == pytest.approx(stats.ttest_rel(A, B).pvalue)
    assert (a.p_holm, b.p_holm) == pytest.approx(tuple(holm([a.p_value, b.p_value])))
    big = by_arm["a [big]"].deltas[M.VAL_BPB]
    assert big.delta == pytest.approx(a.delta)  # against the baseline of its own size, not 0.5 off
    assert big.p_holm == big.p_value  # a family of one


def test_a_history_is_summarised_as_asked():
    values = [2.0, 1.6, 1.5, 1.7]
    assert M.summarise_history(values, "last") == 1.7
    assert M.summarise_history(values, "min") == 1.5
    assert M.summarise_history(values, "mean_last_3") == pytest.approx(1.6)
    assert M.summarise_history(values, "mean_last_9") == pytest.approx(1.7)
    with pytest.raises(ValueError, match="summary 'mean_last_0' is not allowed; allowed: last, min, max"):
        M.check_summary("mean_last_0")
