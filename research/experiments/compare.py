"""Turn a grid's MLflow runs into an answer: what each arm costs and buys, with error bars.

``compare(["attention"])`` reads the runs of one or more grids (MLflow experiments), keeps the
latest run of each (arm, seed), and produces

- per arm: mean +- std over seeds of each metric, each run's number taken from its history as
  the metric's summary says (last, min, max, mean of the last K); the delta against the baseline
  arm with a 95% confidence interval, paired by seed (``research.experiments.significance``), its
  p-value with Holm's correction across the arms, Wilcoxon's test, and the seeds a difference of
  that size needs;
- what each arm trained: steps, tokens and training FLOPs, and the budget that set them;
- on a ladder of sizes (``grid.sizes``), each arm at each size against the baseline at that size,
  and per arm a scaling fit of val/bpb against compute (``research.experiments.scaling``);
- plots: validation curves (mean and band over seeds), quality against throughput and against
  memory (Pareto), expert-load heatmaps of MoE arms;
- a folder with a self-contained ``report.html``, ``summary.md``, ``runs.csv`` and
  ``summary.json``, also logged to MLflow as the artifacts of a run tagged ``lab.kind=report``.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from research import metrics as M
from research.experiments import scaling
from research.experiments.report import print_tables, write_report
from research.experiments.significance import ALPHA, POWER, Delta, compare_by_seed, holm
from research.runtime import stamped
from research.tracking import store
from research.tracking import tags as T

matplotlib.use("Agg")  # files only, also where a display exists


@dataclass
class RunRecord:
    run_id: str
    experiment: str
    arm: str
    seed: int
    status: str
    reason: str
    metrics: dict[str, float]
    baseline: str | None = None
    collapsed: bool = False  # tagged moe.collapsed: its routing collapsed (MoEMonitor)
    base: str = ""  # tag grid.base: the launch's config without its arms ("" before it was recorded)
    started: int = 0  # start time, ms
    params: dict[str, str] = field(default_factory=dict)
    size: str = ""  # its rung of the grid's ladder (param grid.size; "" without one)

    @property
    def cell(self) -> str:  # its arm at its size
        return f"{self.arm} [{self.size}]" if self.size else self.arm


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds (nan for one seed)
    n: int


@dataclass
class ArmSummary:
    arm: str  # its arm at its size (RunRecord.cell)
    finished: int
    failed: int
    is_baseline: bool = False
    size: str = ""  # its rung of the ladder: Holm's family is the arms of one size
    stats: dict[str, Stat] = field(default_factory=dict)
    deltas: dict[str, Delta] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    collapsed: list[int] = field(default_factory=list)  # seeds whose routing collapsed


def load_runs(uri: str, experiments: list[str], where: dict[str, str] | None = None) -> list[RunRecord]:
    """The latest run of each (experiment, arm, seed), a FINISHED one preferred; ``where`` keeps runs
    whose params match (e.g. ``{"model.name": "small"}``)."""
    client = store.client(uri)
    latest: dict[tuple[str, str, int, str, str], Any] = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ValueError(f"compare: no MLflow experiment '{name}' in {uri}")
        for run in client.search_runs(
            [exp.experiment_id], max_results=50_000, order_by=["attributes.start_time ASC"]
        ):
            if T.KIND in run.data.tags:
                continue
            if where and any(run.data.params.get(k) != str(v) for k, v in where.items()):
                continue
            key = (name, run.data.tags.get(T.ARM, "(defaults)"), int(run.data.params.get("seed", 0)),
                   run.data.tags.get(T.GRID_BASE, ""), run.data.params.get("grid.size", ""))  # fmt: skip
            prev = latest.get(key)
            if prev is None or run.info.status == "FINISHED" or prev.info.status != "FINISHED":
                latest[key] = run
    return [
        RunRecord(
            run.info.run_id,
            exp_name,
            arm,
            seed,
            run.info.status,
            run.data.tags.get(T.FAILURE_REASON, ""),
            dict(run.data.metrics),
            run.data.tags.get(T.BASELINE),
            run.data.tags.get(T.MOE_COLLAPSED) == "true",
            base,
            run.info.start_time or 0,
            dict(run.data.params),
            size,
        )
        for (exp_name, arm, seed, base, size), run in latest.items()
    ]


# Params that say where or how a run was recorded, or which arm and seed it is: never a reason
# two launches of a grid differ.
_BOOKKEEPING = ("seed", "grid.", "tracking.", "cluster.", "resume", "ablation", "trainer.progress_bar",
                "data.cache_dir", "trainer.requeue_signal")  # fmt: skip


def like_with_like(runs: list[RunRecord], all_configs: bool = False) -> tuple[list[RunRecord], list[str]]:
    """Runs of one experiment launched with different configs beside their arms (another corpus,
    other steps) never share a table: keep the newest launch's config, and say what the others
    differ in; ``all_configs`` keeps every config, each as arms of its own ("ARM [cfg HASH]")."""
    kept, notes = [], []
    for exp in dict.fromkeys(r.experiment for r in runs):
        groups: dict[str, list[RunRecord]] = {}
        for r in (r for r in runs if r.experiment == exp):
            groups.setdefault(r.base, []).append(r)
        if len(groups) == 1:
            kept += next(iter(groups.values()))
            continue
        newest = max(groups, key=lambda b: max(r.started for r in groups[b]))
        for base, group in groups.items():
            if all_configs:
                for r in group:
                    r.arm = f"{r.arm} [cfg {base[:6] or 'old'}]"
                kept += group
            elif base == newest:
                kept += group
            else:
                why = _difference(group, groups[newest])
                notes.append(
                    f"{exp}: {len(group)} run(s) of another config left out ({why}); --all-configs shows them"
                )
    return kept, notes


def _difference(other: list[RunRecord], newest: list[RunRecord]) -> str:
    """The first keys (not the arm's) in which a run of ``other`` differs from one of the same arm."""
    by_arm = {r.arm: r for r in newest}
    a = next((r for r in other if r.arm in by_arm), other[0])
    b = by_arm.get(a.arm, newest[0])
    keys = sorted(k for k in a.params.keys() | b.params.keys()
                  if not k.startswith(_BOOKKEEPING) and a.params.get(k) != b.params.get(k))  # fmt: skip
    if not keys:
        return "launched with other overrides"
    shown = ", ".join(f"{k}={a.params.get(k)!r} there, {b.params.get(k)!r} here" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def what_it_compares(runs: list[RunRecord]) -> str:
    """One line: the corpus, tokenizer, steps, tokens, preset, precision and seeds of the runs."""

    def values(*keys: str) -> str:
        found = {" ".join(str(r.params.get(k)) for k in keys if r.params.get(k) not in (None, "None", ""))
                 for r in runs}  # fmt: skip
        return "/".join(sorted(v for v in found if v)) or "?"

    tokens = {t for t in map(_tokens, runs) if t is not None}
    seeds = ",".join(str(s) for s in sorted({r.seed for r in runs}))
    return (f"compares: corpus {values('data.source', 'data.path', 'data.name')}, tokenizer "
            f"{values('data.tokenizer')}, {values('trainer.max_steps')} steps "
            f"({'/'.join(f'{t:,}' for t in sorted(tokens)) or '?'} tokens), model {values('model.name')}, "
            f"precision {values('precision.name')}, seeds {seeds}")  # fmt: skip


def summarise(runs: list[RunRecord], metrics: tuple[str, ...], baseline: str | None) -> list[ArmSummary]:
    """Per arm (at each size: a ladder's arms are compared with the baseline at their own size):
    mean and std of each metric over the finished seeds, and the delta against ``baseline``
    paired by seed, with Holm's correction over the arms of a size for each metric."""
    cells: dict[str, list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: (r.size, r.arm, r.seed)):
        cells.setdefault(r.cell, []).append(r)
    out = []
    for rs in cells.values():
        first = rs[0]
        base_cell = f"{baseline} [{first.size}]" if first.size else baseline
        finished, failed = sum(r.status == "FINISHED" for r in rs), sum(r.status == "FAILED" for r in rs)
        s = ArmSummary(first.cell, finished, failed, is_baseline=first.arm == baseline, size=first.size)
        s.failures = [f"seed {r.seed}: {r.reason or r.status}" for r in rs if r.status != "FINISHED"]
        s.collapsed = [r.seed for r in rs if r.collapsed]
        for m in metrics:
            values = _by_seed(rs, m)
            if values:
                std = float(np.std(list(values.values()), ddof=1)) if len(values) > 1 else math.nan
                s.stats[m] = Stat(float(np.mean(list(values.values()))), std, len(values))
            base = _by_seed(cells.get(base_cell or "", []), m)
            if values and base and not s.is_baseline:
                s.deltas[m] = compare_by_seed(values, base)
        out.append(s)
    for m in metrics:  # one family per metric and size: the arms compared with that baseline
        for size in dict.fromkeys(r.size for r in runs):
            family = [s.deltas[m] for s in out if m in s.deltas and s.size == size]
            for d, adjusted in zip(family, holm([d.p_value for d in family]), strict=True):
                d.p_holm = adjusted
    return out


def _by_seed(runs: list[RunRecord], metric: str) -> dict[int, float]:
    return {r.seed: r.metrics[metric] for r in runs if r.status == "FINISHED" and metric in r.metrics}


def apply_summaries(uri: str, runs: list[RunRecord], how: dict[str, str]) -> None:
    """Each run's number for each metric in ``how`` (other than ``last``) from its history."""
    client = store.client(uri)
    for metric, choice in how.items():
        M.check_summary(choice)
        if choice == "last":
            continue
        for r in runs:
            if metric in r.metrics:
                history = sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, metric))
                r.metrics[metric] = M.summarise_history([v for _, v in history], choice)


# --- plots -----------------------------------------------------------------------------------


def _curves(
    uri: str, runs: list[RunRecord], metric: str = M.VAL_BPB
) -> dict[str, list[list[tuple[int, float]]]]:
    client = store.client(uri)
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for r in runs:
        if r.status == "FINISHED":
            history = sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, metric))
            curves.setdefault(r.cell, []).append(history)
    return curves


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, seeds in curves.items():
        steps = sorted(set.intersection(*(set(s for s, _ in h) for h in seeds)))
        if not steps:
            continue
        values = np.array([[dict(h)[s] for s in steps] for h in seeds])
        mean = values.mean(0)
        ax.plot(steps, mean, marker="o", label=arm)
        if len(seeds) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
    ax.set(
        xlabel="step",
        ylabel="val/bpb (lower is better)",
        title="Validation curves (mean; band: min-max over seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pareto_front(points: list[tuple[float, float]], x_higher_better: bool) -> list[int]:
    """Indices not dominated: lower y is better; x is better higher (throughput) or lower (memory)."""
    sign = -1 if x_higher_better else 1
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(sign * x2 <= sign * x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in points)
    ]


def plot_pareto(summaries: list[ArmSummary], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    axes_spec = [
        (M.TOKENS_PER_S, "tokens/s (higher is better)", not M.spec_of(M.TOKENS_PER_S).lower_is_better),
        (M.PEAK_MEM_GIB, "peak memory GiB", not M.spec_of(M.PEAK_MEM_GIB).lower_is_better),
    ]
    rows = [s for s in summaries if M.VAL_BPB in s.stats]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, label, higher) in zip(axes, axes_spec, strict=True):
        pts = [(s, s.stats[metric]) for s in rows if metric in s.stats]
        front = set(_pareto_front([(st.mean, s.stats[M.VAL_BPB].mean) for s, st in pts], higher))
        for i, (s, st) in enumerate(pts):
            y = s.stats[M.VAL_BPB]
            ax.errorbar(st.mean, y.mean, xerr=np.nan_to_num(st.std), yerr=np.nan_to_num(y.std), fmt="o",
                        ms=9 if i in front else 6, label=s.arm + (" *" if i in front else ""))  # fmt: skip
        ax.set(
            xlabel=label,
            ylabel="val/bpb (lower is better)",
            title=f"Quality vs {metric.split('/')[1]} (* Pareto)",
        )
        ax.grid(alpha=0.3)
        if pts:  # a metric no run recorded (peak memory on a CPU) leaves its panel empty
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_ratios(loads: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """Each expert's load over its layer's mean ([layers, experts] per arm), and the top of the one
    colour scale for all arms: the largest ratio seen, at least 2. A fixed cap would paint a
    collapsed layer (E/K times the mean) like a mildly uneven one."""
    ratios = {arm: load / np.maximum(load.mean(1, keepdims=True), 1e-12) for arm, load in loads.items()}
    return ratios, max(2.0, *(float(r.max()) for r in ratios.values()))


def plot_expert_loads(uri: str, runs: list[RunRecord], path: Path) -> Path | None:
    """One heatmap per MoE arm: the share of routed tokens each expert got, per layer (validation)."""
    import matplotlib.pyplot as plt
    from mlflow.exceptions import MlflowException

    client = store.client(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny file is noise
    loads: dict[str, np.ndarray] = {}
    for r in runs:
        if r.status != "FINISHED" or r.cell in loads or M.MAXVIO_GLOBAL not in r.metrics:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = client.download_artifacts(r.run_id, "expert_load.json", tmp)
            except MlflowException:  # no loads recorded (e.g. an interrupted run): leave it out
                continue
            loads[r.cell] = np.array(json.loads(Path(local).read_text())["loads"], dtype=float)
    if not loads:
        return None
    from matplotlib.colors import TwoSlopeNorm

    ratios, top = load_ratios(loads)
    norm = TwoSlopeNorm(vmin=0, vcenter=1, vmax=top)
    fig, axes = plt.subplots(len(loads), 1, figsize=(8, 1.2 + 1.6 * len(loads)), squeeze=False)
    for ax, (arm, ratio) in zip(axes[:, 0], ratios.items(), strict=True):
        im = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set(title=f"{arm}: expert load / mean (1 = balanced, max {ratio.max():.2f})", xlabel="expert",
               ylabel="MoE layer")  # fmt: skip
        ax.set_yticks(range(ratio.shape[0]))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- tables and the report -------------------------------------------------------------------


def _fmt(value: float, metric: str) -> str:
    return M.spec_of(metric).format(value)


def _mean_std(st: Stat, metric: str) -> str:
    return _fmt(st.mean, metric) if st.n < 2 else f"{_fmt(st.mean, metric)} ± {_fmt(st.std, metric)}"


def _signed(value: float) -> str:
    return f"{value:+,.0f}" if abs(value) >= 1000 else f"{value:+.3g}"


def _delta(d: Delta) -> str:
    if math.isnan(d.ci_low):
        return f"{_signed(d.delta)} (one seed)"
    if d.ci_low == d.ci_high:
        return f"{_signed(d.delta)} (no spread)"
    holm = f" (Holm {d.p_holm:.2g})" if not math.isnan(d.p_holm) and d.p_holm != d.p_value else ""
    return f"{_signed(d.delta)} [{_signed(d.ci_low)}, {_signed(d.ci_high)}] p={d.p_value:.2g}{holm}"


def tables(summaries: list[ArmSummary], metrics: tuple[str, ...]) -> tuple[list, list]:
    """Rows of the mean +- std table and of the delta table (strings, shared by terminal/HTML/MD)."""
    shown = [m for m in metrics if any(m in s.stats for s in summaries)]
    headers = [M.spec_of(m).label for m in shown]
    means = [["arm", "runs", *headers]]
    for s in summaries:
        cells = [_mean_std(s.stats[m], m) if m in s.stats else "-" for m in shown]
        runs = f"{s.finished} ok" + (f", {s.failed} FAILED" if s.failed else "")
        runs += f", {len(s.collapsed)} COLLAPSED" if s.collapsed else ""
        means.append([s.arm + (" (baseline)" if s.is_baseline else ""), runs, *cells])
    better = ["↓" if M.spec_of(m).lower_is_better else "↑" for m in shown]  # which way is better
    deltas = [["arm", *[f"Δ {h} {b}" for h, b in zip(headers, better, strict=True)]]]
    for s in summaries:
        if not s.is_baseline:
            deltas.append([s.arm, *[_delta(s.deltas[m]) if m in s.deltas else "-" for m in shown]])
    return means, deltas


EVIDENCE = (M.VAL_BPB, M.MAXVIO_GLOBAL)  # the quality questions, tested in full


def evidence_table(summaries: list[ArmSummary]) -> list[list[str]]:
    """Per arm and quality metric: the test, its p, Holm's, Wilcoxon's, and the seeds a
    difference of the observed size needs for p < 0.05 at 80% power."""
    rows = [["arm", "metric", "test (seeds)", "p", "Holm p", "Wilcoxon p", f"seeds for p<{ALPHA:g}"]]
    fmt = lambda p: "-" if math.isnan(p) else f"{p:.2g}"  # noqa: E731
    for s in summaries:
        for m in EVIDENCE:
            d = s.deltas.get(m)
            if d is None or math.isnan(d.p_value):
                continue
            have = s.stats[m].n
            needed = (
                "-"
                if d.seeds_needed is None
                else f"{d.seeds_needed}" + (" (enough)" * (have >= d.seeds_needed))
            )
            rows.append([s.arm, M.spec_of(m).label, f"{d.test} ({have})", fmt(d.p_value), fmt(d.p_holm),
                         fmt(d.wilcoxon_p), needed])  # fmt: skip
    return rows


def _tokens(r: RunRecord) -> int | None:
    try:
        p = r.params
        return (int(p["trainer.max_steps"]) * int(p["data.batch_size"]) * int(p["data.seq_len"])
                * int(p.get("trainer.accumulate", 1)))  # fmt: skip
    except (KeyError, ValueError):
        return None


def training_flops(r: RunRecord) -> float | None:
    """What the run's steps cost: its FLOPs per token (logged once per run) times its tokens."""
    tokens = _tokens(r)
    return (
        None
        if tokens is None or M.FLOPS_PER_TOKEN not in r.metrics
        else tokens * r.metrics[M.FLOPS_PER_TOKEN]
    )


def views_of(runs: list[RunRecord]) -> dict[str, tuple[str, list[str]]]:
    """The grid's ``grid.views`` as its runs recorded them: name -> (baseline, arms), each a
    question one baseline would blur (aux-free against aux-loss, not against a dense baseline)."""
    views: dict[str, tuple[str, list[str]]] = {}
    for r in runs:
        for key, value in r.params.items():
            if key.startswith("grid.views.") and key.endswith(".baseline"):
                name = key.removeprefix("grid.views.").removesuffix(".baseline")
                listed = r.params.get(f"grid.views.{name}.arms", "[]")
                try:
                    arms = [str(a) for a in ast.literal_eval(listed)]
                except (ValueError, SyntaxError):
                    arms = []
                views.setdefault(name, (value, [a for a in arms if a != value]))
    return views


def budget_of_runs(runs: list[RunRecord]) -> str | None:
    """The grid's ``grid.budget`` as its runs recorded it, in words; None for equal steps."""
    for kind, unit in (("tokens", "tokens"), ("flops", "training FLOPs"), ("gpu_seconds", "GPU seconds")):
        found = {r.params.get(f"grid.budget.{kind}") for r in runs} - {None}
        if found:
            return f"{' / '.join(f'{float(v):.3g}' for v in sorted(found))} {unit} per run"
    return None


def compute_table(runs: list[RunRecord]) -> list[list[str]]:
    """What each arm trained: steps, tokens, FLOPs per token and in all (the first finished seed's:
    the seeds of an arm share them)."""
    rows = [["arm", "steps", "tokens", "FLOPs/token", "training FLOPs"]]
    first: dict[str, RunRecord] = {}
    for r in sorted(runs, key=lambda r: (r.size, r.arm, r.status != "FINISHED", r.seed)):
        first.setdefault(r.cell, r)
    for cell, r in first.items():
        tokens, flops = _tokens(r), training_flops(r)
        per_token = r.metrics.get(M.FLOPS_PER_TOKEN)
        rows.append([cell, r.params.get("trainer.max_steps", "?"), f"{tokens:,}" if tokens else "?",
                     f"{per_token:.3g}" if per_token else "?", f"{flops:.3g}" if flops else "?"])  # fmt: skip
    return rows


def scaling_section(
    runs: list[RunRecord], baseline: str, out: Path
) -> tuple[list[list[str]], list[str], Path | None]:
    """On a ladder: per arm, the fit of val/bpb against training FLOPs and its gap to the
    baseline's at 10x the largest compute; the rows, the warnings, the plot."""
    by_arm: dict[str, dict[str, dict[int, tuple[float, float]]]] = {}  # arm -> size -> seed -> (C, L)
    for r in runs:
        flops = training_flops(r)
        if r.status == "FINISHED" and M.VAL_BPB in r.metrics and flops:
            by_arm.setdefault(r.arm, {}).setdefault(r.size, {})[r.seed] = (flops, r.metrics[M.VAL_BPB])
    fits: dict[str, scaling.ArmScaling] = {}
    for arm, sizes in by_arm.items():
        per_compute = {float(np.mean([f for f, _ in seeds.values()])): {s: v for s, (_, v) in seeds.items()}
                       for seeds in sizes.values()}  # fmt: skip
        fits[arm] = scaling.scale_arm(arm, per_compute)
    if not fits:
        return (
            [],
            ["scaling: no finished run recorded its FLOPs per token (runs from before they were)"],
            None,
        )
    notes = [w for f in fits.values() for w in f.warnings]
    rows = [["arm", "sizes", "α [95% CI]", "E [95% CI]", f"val/bpb at {scaling.EXTRAPOLATE:g}x compute",
             "gap vs baseline [95% CI]", "fits cross at (FLOPs)", "trust"]]  # fmt: skip
    base = fits.get(baseline)
    for arm, f in fits.items():
        if f.fit is None:
            rows.append([arm, str(len(f.compute)), "-", "-", "-", "-", "-", "no fit"])
            continue
        top = scaling.EXTRAPOLATE * max(c for g in fits.values() for c in g.compute)
        g = scaling.gap(f, base) if base is not None and arm != baseline else None
        ci = lambda lo, hi: "" if math.isnan(lo) else f" [{lo:.3g}, {hi:.3g}]"  # noqa: E731
        gap_cell = "-" if g is None else f"{g.gap:+.3g}" + ci(*g.ci)
        cross = "-" if g is None else (", ".join(f"{c:.2g}" for c in g.crossings) or "none")
        trust = "baseline" if arm == baseline else ("yes" if g and g.trustworthy else "NO")
        if g is not None and not g.trustworthy:
            notes.append(f"scaling: {arm} against {baseline}: not trustworthy: {g.why_not}")
        alpha, E = f"{f.fit.alpha:.3g}" + ci(*f.alpha_ci), f"{f.fit.E:.3g}" + ci(*f.E_ci)
        rows.append([arm, str(len(f.compute)), alpha, E, f"{float(f.fit(top)):.4f}", gap_cell, cross, trust])
    return rows, notes, scaling.plot(list(fits.values()), out / "scaling.png", "val/bpb")


def export(out: Path, runs: list[RunRecord], summaries: list[ArmSummary]) -> None:
    keys = sorted({k for r in runs for k in r.metrics})
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "arm", "size", "seed", "status", "failure_reason", "run_id", *keys])
        for r in sorted(runs, key=lambda r: (r.experiment, r.size, r.arm, r.seed)):
            writer.writerow([r.experiment, r.arm, r.size, r.seed, r.status, r.reason, r.run_id,
                             *[r.metrics.get(k, "") for k in keys]])  # fmt: skip
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2, default=str))


@dataclass
class Report:
    folder: Path
    summaries: list[ArmSummary]
    runs: list[RunRecord]


def compare(experiments: list[str], uri: str = "sqlite:///mlruns.db", where: dict[str, str] | None = None,
            baseline: str | None = None, metrics: tuple[str, ...] | None = None, out: Path | None = None,
            log_to_mlflow: bool = True, show: bool = True, all_configs: bool = False,
            summaries: dict[str, str] | None = None) -> Report:  # fmt: skip
    """Compare the runs of ``experiments``; write the report folder; return the aggregates.
    ``metrics`` defaults to those ``research.metrics.REPORTED`` lists; ``summaries`` maps a metric
    to how one run's number is read from its history (``research.metrics.SUMMARIES``), over the
    summary its spec names."""
    metrics = metrics or tuple(spec.name for spec in M.REPORTED)
    unknown = [m for m in summaries or {} if m not in M.ALL]
    if unknown:
        raise ValueError(f"--summary {unknown[0]!r} is not a metric; allowed: {', '.join(M.ALL)}")
    how = {m: M.spec_of(m).summary for m in metrics} | (summaries or {})
    for choice in how.values():
        M.check_summary(choice)  # before any query: a typo costs nothing
    runs = load_runs(uri, experiments, where)
    if not runs:
        raise ValueError(
            f"compare: no runs in {', '.join(experiments)}" + (f" matching {where}" if where else "")
        )
    runs, notes = like_with_like(runs, all_configs)
    apply_summaries(uri, runs, how)
    notes.append(what_it_compares(runs))
    read = [f"{M.spec_of(m).label}: {c}" for m, c in how.items() if c != "last"]
    notes += [f"each run's number is its last evaluation, except {', '.join(read)}"] if read else []
    arms = sorted({r.arm for r in runs})
    if baseline is not None and baseline not in arms:
        raise ValueError(f"--baseline '{baseline}' is not an arm here; the arms: {', '.join(arms)}")
    recorded = next((r.baseline for r in runs if r.baseline), None)
    if baseline is None and recorded is not None and recorded not in arms:
        notes.append(f"the grid's baseline '{recorded}' has no runs here: deltas are against '{arms[0]}'")
        recorded = None
    baseline = baseline or recorded or arms[0]
    arm_summaries = summarise(runs, metrics, baseline)
    title = " + ".join(experiments) + (
        f" ({', '.join(f'{k}={v}' for k, v in where.items())})" if where else ""
    )
    means, deltas = tables(arm_summaries, metrics)
    failures = [f"{s.arm} {f}" for s in arm_summaries for f in s.failures]
    failures += [
        f"{s.arm} seed {seed}: routing collapsed (tag {T.MOE_COLLAPSED}): every token of a layer went to "
        "the same experts, so its numbers do not describe the arm's config"
        for s in arm_summaries
        for seed in s.collapsed
    ]

    out = out or stamped(Path("reports") / "_".join(experiments))
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_curves(_curves(uri, runs), out / "val_curves.png")]
    plots += [p for p in (plot_pareto(arm_summaries, out / "pareto.png"),
                          plot_expert_loads(uri, runs, out / "expert_load.png")) if p]  # fmt: skip
    spent = budget_of_runs(runs)
    shown = [
        ("Mean ± std over seeds", means),
        ("Delta vs baseline (95% CI; paired by seed where the arms share their seeds, else Welch; "
         "Holm-adjusted p over the arms)", deltas),
        (f"Evidence: tests of each difference, and the seeds it needs for p < {ALPHA:g} at {POWER:.0%} power",
         evidence_table(arm_summaries)),
        (f"What each arm trained ({f'budget: {spent}' if spent else 'equal steps'})", compute_table(runs)),
    ]  # fmt: skip
    for name, (view_base, view_arms) in views_of(runs).items():
        subset = [r for r in runs if r.arm in (view_base, *view_arms)]
        if any(r.arm == view_base for r in subset):
            _, view_deltas = tables(summarise(subset, metrics, view_base), metrics)
            shown.append((f"View {name}: {', '.join(view_arms)} against {view_base}", view_deltas))
        else:
            notes.append(f"view {name}: its baseline '{view_base}' has no runs here")
    if len({r.size for r in runs}) > 1:
        rows, scaling_notes, scaling_plot = scaling_section(runs, baseline, out)
        notes += scaling_notes
        if rows:
            shown.append(("Scaling: val/bpb = E + A·C^-α per arm over the sizes (C: training FLOPs; "
                          "95% CIs by bootstrap over seeds)", rows))  # fmt: skip
        plots += [scaling_plot] if scaling_plot else []
    shown = [(caption, rows) for caption, rows in shown if len(rows) > 1]
    write_report(out, title, shown, failures, plots, notes)
    export(out, runs, arm_summaries)
    if show:
        print_tables(
            [(f"{title}: {caption[0].lower()}{caption[1:]}", rows) for caption, rows in shown], failures
        )
        print("\n".join(notes))
        print(f"report: {out}/report.html")
    if log_to_mlflow:
        _log_report(uri, experiments[0], out, title, [r.run_id for r in runs])
    return Report(out, arm_summaries, runs)


def _log_report(uri: str, experiment: str, folder: Path, title: str, run_ids: list[str]) -> None:
    """The report as a run of the experiment: the same runs compared again (a relaunch that ran
    nothing new, a second ``lab compare``) update their report run instead of adding one."""
    client = store.client(uri)
    exp = client.get_experiment_by_name(experiment)
    of = hashlib.sha256(f"{title}\n{','.join(sorted(run_ids))}".encode()).hexdigest()[:16]
    found = client.search_runs([exp.experiment_id], f"tags.`{T.REPORT_OF}` = '{of}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.set_tag(run_id, "mlflow.runName", f"report {folder.name}")
    else:
        tags = {T.KIND: "report", T.REPORT_OF: of}
        run_id = client.create_run(exp.experiment_id, run_name=f"report {folder.name}", tags=tags).info.run_id
    client.log_artifacts(run_id, str(folder))
    client.set_tag(run_id, "mlflow.note.content", title)
    client.set_terminated(run_id, "FINISHED")
