"""Scaling fits per arm: recovery on synthetic power laws, honesty where the data cannot say, and a
two-size ladder of real runs through `lab grid` to its plot."""

import numpy as np
import pytest
from matplotlib import image

from research.experiments import scaling
from tests.cli_helpers import run_lab
from tests.test_grid import write_grid

E, A, ALPHA = 1.8, 0.9, 0.3
COMPUTE = np.geomspace(1e14, 1e17, 6)


def synthetic(E=E, A=A, alpha=ALPHA, noise=0.01, seeds=4, compute=COMPUTE, rng=None):
    """{compute: {seed: loss}} from L = E + A (C / c_ref)^-alpha plus noise per seed."""
    rng = rng or np.random.default_rng(0)
    c_ref = np.exp(np.log(compute).mean())
    return {float(c): {s: float(E + A * (c / c_ref) ** -alpha + rng.normal(0, noise)) for s in range(seeds)}
            for c in compute}  # fmt: skip


def test_the_fit_recovers_the_exponent_and_its_interval_covers_the_truth():
    fit = scaling.scale_arm("a", synthetic(), seed=0)
    assert fit.fit.full and not fit.warnings
    assert fit.fit.alpha == pytest.approx(ALPHA, abs=0.02)
    assert pytest.approx(E, abs=0.02) == fit.fit.E
    assert fit.alpha_ci[0] <= ALPHA <= fit.alpha_ci[1]
    assert fit.E_ci[0] <= E <= fit.E_ci[1]
    assert fit.alpha_ci[1] - fit.alpha_ci[0] < 0.05  # an interval that says something


def test_the_interval_covers_the_truth_about_as_often_as_it_says():
    covered = [
        (lambda f: f.alpha_ci[0] <= ALPHA <= f.alpha_ci[1])(
            scaling.scale_arm("a", synthetic(rng=np.random.default_rng(trial)), seed=trial)
        )
        for trial in range(12)
    ]
    assert sum(covered) >= 9  # nominal 95%; a percentile bootstrap over 4 seeds runs a little short


def test_two_arms_gap_and_crossing_are_where_the_laws_put_them():
    # b starts worse and falls faster: the curves cross inside the ladder, and b leads at 10x
    a = scaling.scale_arm("a", synthetic(noise=0.002))
    b = scaling.scale_arm("b", synthetic(E=1.75, A=1.0, alpha=0.4, noise=0.002, rng=np.random.default_rng(1)))
    g = scaling.gap(b, a)
    top = 10 * COMPUTE.max()
    c_ref = np.exp(np.log(COMPUTE).mean())
    truth = (1.75 + 1.0 * (top / c_ref) ** -0.4) - (E + A * (top / c_ref) ** -ALPHA)
    assert g.gap == pytest.approx(truth, abs=0.01) and g.ci[0] <= truth <= g.ci[1]
    assert g.trustworthy, g.why_not
    (cross,) = g.crossings
    law = lambda c, e, k, al: e + k * (c / c_ref) ** -al  # noqa: E731
    assert law(cross, 1.75, 1.0, 0.4) == pytest.approx(law(cross, E, A, ALPHA), abs=0.01)


def test_too_few_sizes_or_a_gap_inside_its_noise_is_called_untrustworthy():
    few = scaling.scale_arm("a", synthetic(compute=COMPUTE[:2]))
    assert not few.fit.full and "2 sizes" in few.warnings[0] and "E = 0" in few.warnings[0]
    same = scaling.scale_arm("b", synthetic(noise=0.05, rng=np.random.default_rng(3)))
    base = scaling.scale_arm("a", synthetic(noise=0.05, rng=np.random.default_rng(4)))
    g = scaling.gap(same, base)
    assert not g.trustworthy and "wider than the gap" in g.why_not
    one = scaling.scale_arm("c", {1e15: {0: 2.0}})
    assert one.fit is None and "one size" in one.warnings[0]


def test_a_two_size_ladder_runs_end_to_end_and_draws_each_arm_on_the_scaling_plot(tmp_path, shared_cache):
    ladder = "sizes: [tiny, {preset: tiny, d_model: 96, name: wide}]"
    view = "views: {gqa_vs_mla: {baseline: mla, arms: [gqa]}}"  # a question the baseline would blur
    arms = "arms: {mha: [attention=mha], mla: [attention=mla], gqa: [attention=gqa]}"
    write_grid(tmp_path, "ladder", f"{arms}\nbaseline: mha\nseeds: [0, 1]\n{ladder}\n{view}")
    proc = run_lab(tmp_path, "grid", "ladder", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scaling: val/bpb = e + a·c^-α per arm" in proc.stdout.lower()
    assert "mla [wide]" in proc.stdout and "not trustworthy" in proc.stdout  # two sizes: said plainly
    view = proc.stdout[proc.stdout.index("view gqa_vs_mla: gqa against mla") :].split("scaling:")[0]
    assert "gqa [tiny]" in view and "gqa [wide]" in view and "mha [" not in view
    (report,) = (tmp_path / "reports").glob("ladder/*/report.html")
    assert "<figcaption>scaling</figcaption>" in report.read_text()  # embedded in the page
    # Look at the plot: drawn, and each arm in its own colour (matplotlib's first two).
    pixels = image.imread(report.parent / "scaling.png")[..., :3]
    assert pixels.shape[0] > 300 and pixels.std() > 0.05
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        near = np.abs(pixels - np.array(colour) / 255).max(axis=-1) < 0.08
        assert near.sum() > 200, f"no arm drawn in {colour}"
