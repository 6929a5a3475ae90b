"""The quality gate: do the GPU defaults learn what every speed option off learns?

    python -m bench.quality [--jobs 15] [OVERRIDES ...]

It runs the grid ``ablations/quality_gate.yaml`` through the real user path (``lab grid``: the
config tree, ``lab train`` per run, LitLM, the data module, the callbacks, MLflow), each arm of a
covering set of the axes once with ``speed=auto`` (compiled blocks, CUDA graphs, the fused loss,
bf16 expert weights: what a GPU run gets by default) and once with ``speed=plain`` (all of them
off), over several seeds. Then, arm by arm, the rule:

- every run finished, and ``speed=auto`` collapsed its routing in no more seeds than ``speed=plain``;
- val/bpb: the fast path fails when it is worse by more than ``BPB_FLOOR`` and a one-sided t-test
  says so at p < ``P_VALUE``; when it is worse by more than ``BPB_HARD`` and the test says so at
  p < ``P_HARD`` (three seeds give the strict test little power: a large gap needs less evidence);
  or when it is worse by more than ``BPB_COLLAPSE`` whatever the seeds say (a gap no seed spread
  explains: the compiled MoE collapse cost 3 bpb). A gap is not judged by its size alone below
  that: 200 steps of a MoE arm differ by about 0.1 bpb from seed to seed, and between the two
  paths on one seed, so three seeds' mean moves by 0.05 by chance one time in five;
- MaxVio (``moe/maxvio_global``): fails when it differs both by more than its floor (the larger of
  ``MAXVIO_FLOOR`` and ``MAXVIO_REL`` of the plain mean) and by a two-sided t-test at
  p < ``P_VALUE``, or by more than ``MAXVIO_HARD`` times that floor.

The t-tests pair the runs seed by seed (the same seed gives both the same initial weights and data
order), and fall back to Welch's test where the seeds differ.

Before the grid, a check that takes seconds: the gradients of one real batch through the compiled
blocks (and the fused loss) against eager ones, ``--parity-repeats`` times on fresh copies of the
grid's first arm; the gate fails where the worst relative error passes ``PARITY_MAX``. Rounding
in bf16, and tokens near a routing tie that then pick another expert, give 5e-3 to 7e-2; the
fault that made compiled MoE collapse gave 1e3 in about half the repetitions, and no training
run is needed to see it.

The table's "detectable Δ" is the smallest gap the strict test would flag with these seeds'
spread (t quantile x the paired differences' standard error): what a pass rules out.

It prints one table, writes ``verdict.json`` (also ``reports/quality_gate/latest.json``, which
``bench.throughput`` prints beside its table) and exits 1 when any arm fails. A speed option
counts as done only when this gate passes on the GPU it was made for.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from research import metrics as M
from research.experiments.compare import RunRecord, load_runs
from research.experiments.report import print_tables

GRID = "quality_gate"
FAST, PLAIN = "speed=auto", "speed=plain"
P_VALUE, P_HARD = 0.01, 0.05
BPB_FLOOR, BPB_HARD, BPB_COLLAPSE = 0.02, 0.05, 0.5
MAXVIO_FLOOR, MAXVIO_REL, MAXVIO_HARD = 0.25, 0.25, 4.0
PARITY_MAX = 0.5
LATEST = Path("reports") / GRID / "latest.json"


@dataclass
class Comparison:
    fast: tuple[float, float]  # mean, std over seeds
    plain: tuple[float, float]
    delta: float  # fast - plain
    p_value: float
    ok: bool
    detectable: float = math.nan  # the smallest gap the strict test flags with this spread


def t_test_p(a: list[float], b: list[float], alternative: str, paired: bool) -> float:
    """p of a t-test of a against b: paired (seed by seed), else Welch's. With no spread at all,
    0 for any difference and 1 for none."""
    from scipy import stats

    diffs = np.subtract(a, b) if paired else None
    no_spread = np.std(diffs) == 0 if paired else np.std(a) == 0 and np.std(b) == 0
    if len(a) < 2 or len(b) < 2 or no_spread:
        delta = np.mean(a) - np.mean(b)
        return 0.0 if (delta > 0 if alternative == "greater" else delta != 0) else 1.0
    if paired:
        return float(stats.ttest_rel(a, b, alternative=alternative).pvalue)
    return float(stats.ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def detectable_gap(fast: list[float], plain: list[float], paired: bool) -> float:
    """The mean gap at which the one-sided test reaches p = ``P_VALUE`` with this spread."""
    from scipy import stats

    if len(fast) < 2 or len(plain) < 2:
        return math.nan
    if paired:
        se, dof = float(np.std(np.subtract(fast, plain), ddof=1)) / math.sqrt(len(fast)), len(fast) - 1
    else:
        va, vb = np.var(fast, ddof=1) / len(fast), np.var(plain, ddof=1) / len(plain)
        se, dof = math.sqrt(va + vb), min(len(fast), len(plain)) - 1  # Welch's dof, at its least
    return float(stats.t.ppf(1 - P_VALUE, dof)) * se


def judge_bpb(fast: list[float], plain: list[float], paired: bool) -> Comparison:
    """Fails when the fast path's val/bpb is worse beyond the seeds' spread (module docstring)."""
    delta = float(np.mean(fast) - np.mean(plain))
    p = t_test_p(fast, plain, "greater", paired)
    small, large = delta > BPB_FLOOR and p < P_VALUE, delta > BPB_HARD and p < P_HARD
    worse = small or large or delta > BPB_COLLAPSE
    return Comparison(
        _mean_std(fast), _mean_std(plain), delta, p, not worse, detectable_gap(fast, plain, paired)
    )


def judge_maxvio(fast: list[float], plain: list[float], paired: bool) -> Comparison:
    """Fails when MaxVio differs, either way, beyond its floor and the seeds' spread."""
    delta = float(np.mean(fast) - np.mean(plain))
    floor = max(MAXVIO_FLOOR, MAXVIO_REL * abs(float(np.mean(plain))))
    p = t_test_p(fast, plain, "two-sided", paired)
    differs = (abs(delta) > floor and p < P_VALUE) or abs(delta) > MAXVIO_HARD * floor
    return Comparison(_mean_std(fast), _mean_std(plain), delta, p, not differs)


@dataclass
class ArmVerdict:
    arm: str
    ok: bool
    problems: list[str]
    bpb: Comparison | None
    maxvio: Comparison | None
    speedup: float | None  # tokens/s, fast over plain


def judge_arm(arm: str, fast: list[RunRecord], plain: list[RunRecord]) -> ArmVerdict:
    problems = [f"{FAST if r in fast else PLAIN} seed {r.seed}: {r.status} {r.reason}".strip()
                for r in [*fast, *plain] if r.status != "FINISHED"]  # fmt: skip
    if not fast or not plain:
        problems.append(f"no runs of {FAST if not fast else PLAIN}")
    fast_collapsed = [r.seed for r in fast if r.collapsed]
    plain_collapsed = [r.seed for r in plain if r.collapsed]
    if len(fast_collapsed) > len(plain_collapsed):
        problems.append(
            f"{FAST} routing collapsed in seeds {fast_collapsed}, {PLAIN} in {plain_collapsed or 'none'}"
        )

    def values(runs: list[RunRecord], metric: str) -> list[float]:
        return [r.metrics[metric] for r in sorted(runs, key=lambda r: r.seed)
                if r.status == "FINISHED" and metric in r.metrics]  # fmt: skip

    def seeds(runs: list[RunRecord], metric: str) -> list[int]:
        return sorted(r.seed for r in runs if r.status == "FINISHED" and metric in r.metrics)

    bpb = maxvio = speedup = None
    if values(fast, M.VAL_BPB) and values(plain, M.VAL_BPB):
        paired = seeds(fast, M.VAL_BPB) == seeds(plain, M.VAL_BPB)  # a seed's runs share data and init
        bpb = judge_bpb(values(fast, M.VAL_BPB), values(plain, M.VAL_BPB), paired)
        if not bpb.ok:
            problems.append(f"val/bpb worse by {bpb.delta:+.3f} (p={bpb.p_value:.2g})")
    if values(fast, M.MAXVIO_GLOBAL) and values(plain, M.MAXVIO_GLOBAL):
        paired = seeds(fast, M.MAXVIO_GLOBAL) == seeds(plain, M.MAXVIO_GLOBAL)
        maxvio = judge_maxvio(values(fast, M.MAXVIO_GLOBAL), values(plain, M.MAXVIO_GLOBAL), paired)
        if not maxvio.ok:
            problems.append(f"MaxVio differs by {maxvio.delta:+.2f} (p={maxvio.p_value:.2g})")
    if values(fast, M.TOKENS_PER_S) and values(plain, M.TOKENS_PER_S):
        speedup = float(np.mean(values(fast, M.TOKENS_PER_S)) / np.mean(values(plain, M.TOKENS_PER_S)))
    return ArmVerdict(arm, not problems, problems, bpb, maxvio, speedup)


def judge(runs: list[RunRecord]) -> list[ArmVerdict]:
    """One verdict per arm of the grid: its ``speed=auto`` runs against its ``speed=plain`` ones."""
    arms = sorted({r.arm.removesuffix(FAST).removesuffix(PLAIN).strip() for r in runs})
    return [judge_arm(arm, [r for r in runs if r.arm == f"{arm} {FAST}"],
                      [r for r in runs if r.arm == f"{arm} {PLAIN}"]) for arm in arms]  # fmt: skip


def _cell(c: Comparison | None, fmt: str) -> tuple[str, str, str]:
    if c is None:
        return "-", "-", "-"
    ms = lambda m, s: f"{m:{fmt}} ± {s:{fmt}}" if not math.isnan(s) else f"{m:{fmt}}"  # noqa: E731
    return ms(*c.plain), ms(*c.fast), f"{c.delta:+{fmt}} (p={c.p_value:.2g})"


def table(verdicts: list[ArmVerdict]) -> list[list[str]]:
    rows = [["arm", "plain val/bpb", "fast val/bpb", "Δ bpb", "detectable Δ bpb", "plain MaxVio",
             "fast MaxVio", "Δ MaxVio", "fast/plain tok/s", "verdict"]]  # fmt: skip
    for v in verdicts:
        speedup = f"{v.speedup:.2f}x" if v.speedup else "-"
        detectable = f"{v.bpb.detectable:.3f}" if v.bpb and not math.isnan(v.bpb.detectable) else "-"
        rows.append([v.arm, *_cell(v.bpb, ".3f"), detectable, *_cell(v.maxvio, ".2f"), speedup,
                     "pass" if v.ok else "FAIL"])  # fmt: skip
    return rows


def latest_verdict() -> str:
    """One line on the last gate run here (for ``bench.throughput``'s table, which runs where only
    the device image's packages are: no Hydra or MLflow, hence the guarded import)."""
    if not LATEST.exists():
        return "quality gate: not run here (python -m bench.quality)"
    v = json.loads(LATEST.read_text())
    try:
        from research.tracking.store import git_revision

        same = "this tree" if v["tree"] == git_revision() else f"tree {v['tree']}, not this one"
    except ImportError:  # its imports need omegaconf
        same = f"tree {v['tree']}"
    failed = [a["arm"] for a in v["arms"] if not a["ok"]]
    return (
        f"quality gate: {'PASS' if v['pass'] else 'FAIL'} ({len(v['arms'])} arms"
        + (f", failed: {', '.join(failed)}" if failed else "")
        + f"; {same}, {v['date']})"
    )


def gradient_parity(overrides: list[str], repeats: int) -> list[float]:
    """The worst relative error over the parameters of the compiled path's gradients against eager,
    one per repetition, on one real batch of the gate grid's first arm (module docstring)."""
    import copy

    import torch

    from research.config.compose import compose_run
    from research.experiments.grid import arms, compose_grid
    from research.training import converters as speed
    from research.training.run import build

    first = next(iter(arms(compose_grid(GRID, overrides)).values()))
    data, module = build(compose_run([f"ablations={GRID}", *first, *overrides]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = module.model.to(device)
    batch = next(iter(data.train_dataloader())).to(device)

    def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        with torch.autocast(device, dtype=torch.bfloat16):
            m(batch[:, :-1], batch[:, 1:]).loss.backward()
        return {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    eager = grads(copy.deepcopy(model))
    errors = []
    for _ in range(repeats):
        fast = copy.deepcopy(model)
        speed.compile_blocks(fast)
        speed.fuse_loss(fast)
        errors.append(max(rel(g, eager[n]) for n, g in grads(fast).items()))
    return errors


def main() -> None:
    from research.experiments.grid import run_grid
    from research.tracking import store as tracking

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=15, help="runs at once on the GPU")
    parser.add_argument("--uri", default="sqlite:///quality_gate.db", help="the MLflow store of its runs")
    parser.add_argument("--parity-repeats", type=int, default=4, help="gradient checks before the grid")
    args, overrides = parser.parse_known_args()
    parity = gradient_parity(overrides, args.parity_repeats) if args.parity_repeats else []
    parity_ok = all(e <= PARITY_MAX for e in parity)
    errors = " ".join(f"{e:.1e}" for e in parity)
    print(f"gradient parity, compiled against eager, worst relative error per repetition: {errors} "
          f"-> {'pass' if parity_ok else 'FAIL'} (at most {PARITY_MAX})")  # fmt: skip
    experiment = f"{GRID}_{datetime.now():%Y%m%d_%H%M%S}"  # a fresh one: finished runs are never reused
    run_grid(
        GRID, [*overrides, f"tracking.uri={args.uri}", f"tracking.experiment={experiment}"], jobs=args.jobs
    )
    verdicts = judge(load_runs(args.uri, [experiment]))
    passed = bool(verdicts) and all(v.ok for v in verdicts) and parity_ok
    rule = (f"fast fails where val/bpb is worse by > {BPB_FLOOR} at one-sided paired t p < {P_VALUE}, "
            f"by > {BPB_HARD} at p < {P_HARD}, or by > {BPB_COLLAPSE}; or MaxVio differs by > "
            f"max({MAXVIO_FLOOR}, {MAXVIO_REL} x plain) at p < {P_VALUE}, or by > {MAXVIO_HARD}x that; "
            f"or a run failed or collapsed; or a gradient of the compiled path is off by > {PARITY_MAX} "
            "(relative)")  # fmt: skip
    print_tables([(f"quality gate {experiment}: speed=auto (fast) against speed=plain", table(verdicts))],
                 [f"{v.arm}: {p}" for v in verdicts for p in v.problems])  # fmt: skip
    print(f"rule: {rule}")
    print(f"quality gate: {'PASS' if passed else 'FAIL'}")
    when = datetime.now().isoformat(timespec="seconds")
    record = {"pass": passed, "tree": tracking.git_revision(), "date": when, "experiment": experiment,
              "uri": args.uri, "overrides": overrides, "rule": rule, "gradient_parity": parity,
              "arms": [asdict(v) for v in verdicts]}  # fmt: skip
    out = Path("reports") / GRID / experiment
    out.mkdir(parents=True, exist_ok=True)
    for path in (out / "verdict.json", LATEST):
        path.write_text(json.dumps(record, indent=2))
    print(f"verdict: {out / 'verdict.json'}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
