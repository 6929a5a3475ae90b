"""Scaling fits per arm over a ladder of sizes: L(C) = E + A * C^(-alpha), loss against training
compute, with confidence intervals from a bootstrap over seeds.

A fit says how an arm's loss falls with compute; two arms' fits say whether a gain found at the
small sizes grows or shrinks with scale: where the curves cross, and the gap extrapolated to ten
times the largest compute run. Extrapolation is where fits mislead, so each fit says plainly when
it should not be trusted: with fewer than four sizes the three-parameter law is not identified
(a pure power law, E = 0, is fitted instead), and a gap whose interval is wider than the gap
itself is not a finding.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import OptimizeWarning, brentq, curve_fit

MIN_SIZES_FULL = 4  # sizes needed to fit E, A and alpha with one degree of freedom left
BOOTSTRAP = 400
EXTRAPOLATE = 10.0  # the gap is reported at this many times the largest compute run
ALPHA = 0.05  # 95% intervals


@dataclass
class Fit:
    E: float
    A: float  # at C = c_ref: L(C) = E + A * (C / c_ref)^-alpha
    alpha: float
    c_ref: float
    full: bool  # all three fitted; False: E fixed at 0 (too few sizes)

    def __call__(self, c: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * (np.asarray(c, dtype=float) / self.c_ref) ** -self.alpha


@dataclass
class ArmScaling:
    arm: str
    compute: list[float]  # per size, mean over seeds
    loss: list[float]  # per size, mean over seeds
    fit: Fit | None
    runs: list[tuple[float, float]] = field(default_factory=list)  # (compute, loss) of each seed's run
    alpha_ci: tuple[float, float] = (math.nan, math.nan)
    E_ci: tuple[float, float] = (math.nan, math.nan)
    boot: list[Fit] = field(default_factory=list, repr=False)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Gap:
    arm: str
    baseline: str
    at_compute: float
    gap: float  # arm's fitted loss - baseline's, at at_compute
    ci: tuple[float, float]
    crossings: list[float]  # compute values where the two fits cross, within the plotted range
    trustworthy: bool
    why_not: str = ""


def _law(c: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    return E + A * c**-alpha


def fit_law(compute: np.ndarray, loss: np.ndarray) -> Fit:
    """Least squares of L = E + A (C/c_ref)^-alpha (c_ref: the geometric mean of C, so that A and
    alpha are not at the mercy of C's magnitude); E is fixed at 0 below ``MIN_SIZES_FULL`` sizes."""
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    c_ref = float(np.exp(np.log(compute).mean()))
    x = compute / c_ref
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)  # the pure power law, E = 0
    pure = Fit(0.0, float(np.exp(intercept)), float(-slope), c_ref, full=False)
    if len(np.unique(compute)) < MIN_SIZES_FULL:
        return pure
    lowest = float(loss.min())
    start = (0.5 * lowest, max(float(np.exp(intercept)) - 0.5 * lowest, 1e-6), max(pure.alpha, 0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        try:
            (E, A, alpha), _ = curve_fit(_law, x, loss, p0=start, maxfev=20_000,
                                         bounds=([0.0, 0.0, 0.0], [lowest, np.inf, 5.0]))  # fmt: skip
        except (RuntimeError, ValueError):
            return pure
    return Fit(float(E), float(A), float(alpha), c_ref, full=True)


def scale_arm(arm: str, by_size: dict[float, dict[int, float]], seed: int = 0) -> ArmScaling:
    """Fit one arm from ``{compute: {seed: loss}}``, one entry per size; intervals from refits on
    seeds resampled with replacement within each size."""
    computes = sorted(by_size)
    mean_loss = [float(np.mean(list(by_size[c].values()))) for c in computes]
    out = ArmScaling(arm, computes, mean_loss, None, [(c, v) for c in computes for v in by_size[c].values()])
    if len(computes) < 2:
        out.warnings.append(f"{arm}: one size; a scaling fit needs two or more")
        return out
    out.fit = fit_law(np.array(computes), np.array(mean_loss))
    if not out.fit.full:
        out.warnings.append(f"{arm}: {len(computes)} sizes; E + A*C^-alpha needs {MIN_SIZES_FULL} or more, "
                            "so E = 0 was fitted: not trustworthy to extrapolate")  # fmt: skip
    rng = np.random.default_rng(seed)
    samples = [np.array(list(by_size[c].values())) for c in computes]
    if min(len(s) for s in samples) < 2:
        out.warnings.append(f"{arm}: one seed at some size; no interval")
        return out
    for _ in range(BOOTSTRAP):
        # A resample's mean varies (n-1)/n as much as the mean does: widen it back, or a few seeds
        # give intervals too narrow.
        widen = [math.sqrt(len(s) / (len(s) - 1)) for s in samples]
        resampled = [s.mean() + w * (rng.choice(s, size=len(s)).mean() - s.mean())
                     for s, w in zip(samples, widen, strict=True)]  # fmt: skip
        out.boot.append(fit_law(np.array(computes), np.array(resampled)))
    out.alpha_ci = _interval([f.alpha for f in out.boot])
    out.E_ci = _interval([f.E for f in out.boot])
    return out


def _interval(values: list[float]) -> tuple[float, float]:
    lo, hi = np.percentile(values, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(lo), float(hi)


def gap(arm: ArmScaling, base: ArmScaling) -> Gap | None:
    """The arm's fitted loss minus the baseline's at ``EXTRAPOLATE`` x the largest compute of
    either, with its bootstrap interval, and where the two fits cross."""
    if arm.fit is None or base.fit is None:
        return None
    top = EXTRAPOLATE * max(*arm.compute, *base.compute)
    value = float(arm.fit(top) - base.fit(top))
    ci = (math.nan, math.nan)
    if arm.boot and base.boot:
        ci = _interval([float(a(top) - b(top)) for a, b in zip(arm.boot, base.boot, strict=True)])
    low = min(*arm.compute, *base.compute)
    g = Gap(arm.arm, base.arm, top, value, ci, crossings(arm.fit, base.fit, low, top), True)
    reasons = [w.split(": ", 1)[1] for w in (*arm.warnings, *base.warnings)]
    if math.isnan(ci[0]):
        reasons.append("no interval")
    elif ci[1] - ci[0] > 2 * abs(value):
        reasons.append(f"the gap's 95% interval [{ci[0]:+.3g}, {ci[1]:+.3g}] is wider than the gap")
    if reasons:
        g.trustworthy, g.why_not = False, "; ".join(dict.fromkeys(reasons))
    return g


def crossings(a: Fit, b: Fit, low: float, high: float) -> list[float]:
    """Compute values in [low, high] where the two fitted curves meet."""
    grid = np.geomspace(low, high, 200)
    diff = a(grid) - b(grid)
    out = []
    for i in np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]:
        out.append(
            float(np.exp(brentq(lambda x: a(np.exp(x)) - b(np.exp(x)), np.log(grid[i]), np.log(grid[i + 1]))))
        )
    return out


def plot(arms: list[ArmScaling], path: Path, ylabel: str) -> Path:
    """Loss against training compute: each seed's run, each size's mean, and each arm's fit, drawn
    on to ``EXTRAPOLATE`` x the largest compute (dashed past the data)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    top = EXTRAPOLATE * max(c for a in arms for c in a.compute)
    for a in arms:
        (line,) = ax.plot(a.compute, a.loss, "o", ms=7, label=a.arm)
        ax.plot(*zip(*a.runs, strict=True), ".", ms=4, alpha=0.5, color=line.get_color())
        if a.fit is not None:
            inside = np.geomspace(min(a.compute), max(a.compute), 50)
            beyond = np.geomspace(max(a.compute), top, 50)
            law = f"E={a.fit.E:.3g}, α={a.fit.alpha:.2f}" + ("" if a.fit.full else " (E=0: too few sizes)")
            ax.plot(inside, a.fit(inside), "-", color=line.get_color(), label=f"  fit {law}")
            ax.plot(beyond, a.fit(beyond), "--", color=line.get_color())
            if a.boot:
                band = np.array([f(beyond) for f in a.boot])
                lo, hi = np.percentile(band, [2.5, 97.5], axis=0)
                ax.fill_between(beyond, lo, hi, color=line.get_color(), alpha=0.12)
    ax.axvline(top, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    title = f"Scaling per arm: fit to the sizes, dashed to {EXTRAPOLATE:g}x the largest (95% band)"
    ax.set(xlabel="training FLOPs", ylabel=f"{ylabel} (lower is better)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
