"""Turn a grid's MLflow runs into an answer: what each arm costs and buys, with error bars.

``compare(["attention"])`` reads the runs of one or more grids (MLflow experiments), keeps the
latest run of each (arm, seed), and produces

- per arm: mean +- std over seeds of each metric; the delta against the baseline arm with a 95%
  confidence interval and a Welch t-test p-value;
- plots: validation curves (mean and band over seeds), quality against throughput and against
  memory (Pareto), expert-load heatmaps of MoE arms;
- a folder with a self-contained ``report.html``, ``summary.md``, ``runs.csv`` and
  ``summary.json``, also logged to MLflow as the artifacts of a run tagged ``lab.kind=report``.
"""

from __future__ import annotations

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
from research.experiments.report import print_tables, write_report
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


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds (nan for one seed)
    n: int


@dataclass
class Delta:
    delta: float  # arm mean - baseline mean
    ci_low: float  # 95% Welch confidence interval of the delta (nan with fewer than 2 seeds a side)
    ci_high: float
    p_value: float  # Welch's t-test


@dataclass
class ArmSummary:
    arm: str
    finished: int
    failed: int
    stats: dict[str, Stat] = field(default_factory=dict)
    deltas: dict[str, Delta] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    collapsed: list[int] = field(default_factory=list)  # seeds whose routing collapsed


def load_runs(uri: str, experiments: list[str], where: dict[str, str] | None = None) -> list[RunRecord]:
    """The latest run of each (experiment, arm, seed), a FINISHED one preferred; ``where`` keeps runs
    whose params match (e.g. ``{"model.name": "small"}``)."""
    client = store.client(uri)
    latest: dict[tuple[str, str, int], Any] = {}
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
                   run.data.tags.get(T.GRID_BASE, ""))  # fmt: skip
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
        )
        for (exp_name, arm, seed, base), run in latest.items()
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

    tokens = set()
    for r in runs:
        try:
            p = r.params
            tokens.add(int(p["trainer.max_steps"]) * int(p["data.batch_size"]) * int(p["data.seq_len"])
                       * int(p.get("trainer.accumulate", 1)))  # fmt: skip
        except (KeyError, ValueError):
            continue
    seeds = ",".join(str(s) for s in sorted({r.seed for r in runs}))
    return (f"compares: corpus {values('data.source', 'data.path', 'data.name')}, tokenizer "
            f"{values('data.tokenizer')}, {values('trainer.max_steps')} steps "
            f"({'/'.join(f'{t:,}' for t in sorted(tokens)) or '?'} tokens), model {values('model.name')}, "
            f"precision {values('precision.name')}, seeds {seeds}")  # fmt: skip


def welch(a: list[float], b: list[float]) -> Delta:
    from scipy import stats

    delta = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return Delta(delta, math.nan, math.nan, math.nan)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Delta(delta, delta, delta, math.nan)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, dof)) * se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Delta(delta, delta - half, delta + half, p)


def summarise(runs: list[RunRecord], metrics: tuple[str, ...], baseline: str | None) -> list[ArmSummary]:
    arms: dict[str, list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: (r.arm, r.seed)):
        arms.setdefault(r.arm, []).append(r)
    finished = {arm: [r for r in rs if r.status == "FINISHED"] for arm, rs in arms.items()}
    out = []
    for arm, rs in arms.items():
        s = ArmSummary(arm, len(finished[arm]), sum(r.status == "FAILED" for r in rs))
        s.failures = [f"seed {r.seed}: {r.reason or r.status}" for r in rs if r.status != "FINISHED"]
        s.collapsed = [r.seed for r in rs if r.collapsed]
        for m in metrics:
            values = [r.metrics[m] for r in finished[arm] if m in r.metrics]
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
                s.stats[m] = Stat(float(np.mean(values)), std, len(values))
            base = [r.metrics[m] for r in finished.get(baseline or "", []) if m in r.metrics]
            if values and base and arm != baseline:
                s.deltas[m] = welch(values, base)
        out.append(s)
    return out


# --- plots -----------------------------------------------------------------------------------


def _curves(
    uri: str, runs: list[RunRecord], metric: str = M.VAL_BPB
) -> dict[str, list[list[tuple[int, float]]]]:
    client = store.client(uri)
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for r in runs:
        if r.status == "FINISHED":
            history = sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, metric))
            curves.setdefault(r.arm, []).append(history)
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
        if r.status != "FINISHED" or r.arm in loads or M.MAXVIO_GLOBAL not in r.metrics:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = client.download_artifacts(r.run_id, "expert_load.json", tmp)
            except MlflowException:  # no loads recorded (e.g. an interrupted run): leave it out
                continue
            loads[r.arm] = np.array(json.loads(Path(local).read_text())["loads"], dtype=float)
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
    return f"{_signed(d.delta)} [{_signed(d.ci_low)}, {_signed(d.ci_high)}] p={d.p_value:.2g}"


def tables(summaries: list[ArmSummary], metrics: tuple[str, ...], baseline: str | None) -> tuple[list, list]:
    """Rows of the mean +- std table and of the delta table (strings, shared by terminal/HTML/MD)."""
    shown = [m for m in metrics if any(m in s.stats for s in summaries)]
    headers = [M.spec_of(m).label for m in shown]
    means = [["arm", "runs", *headers]]
    for s in summaries:
        cells = [_mean_std(s.stats[m], m) if m in s.stats else "-" for m in shown]
        runs = f"{s.finished} ok" + (f", {s.failed} FAILED" if s.failed else "")
        runs += f", {len(s.collapsed)} COLLAPSED" if s.collapsed else ""
        means.append([s.arm + (" (baseline)" if s.arm == baseline else ""), runs, *cells])
    better = ["↓" if M.spec_of(m).lower_is_better else "↑" for m in shown]  # which way is better
    deltas = [["arm", *[f"Δ {h} {b}" for h, b in zip(headers, better, strict=True)]]]
    for s in summaries:
        if s.arm != baseline:
            deltas.append([s.arm, *[_delta(s.deltas[m]) if m in s.deltas else "-" for m in shown]])
    return means, deltas


def export(out: Path, runs: list[RunRecord], summaries: list[ArmSummary]) -> None:
    keys = sorted({k for r in runs for k in r.metrics})
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "arm", "seed", "status", "failure_reason", "run_id", *keys])
        for r in sorted(runs, key=lambda r: (r.experiment, r.arm, r.seed)):
            writer.writerow([r.experiment, r.arm, r.seed, r.status, r.reason, r.run_id,
                             *[r.metrics.get(k, "") for k in keys]])  # fmt: skip
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2, default=str))


@dataclass
class Report:
    folder: Path
    summaries: list[ArmSummary]
    runs: list[RunRecord]


def compare(experiments: list[str], uri: str = "sqlite:///mlruns.db", where: dict[str, str] | None = None,
            baseline: str | None = None, metrics: tuple[str, ...] | None = None, out: Path | None = None,
            log_to_mlflow: bool = True, show: bool = True, all_configs: bool = False) -> Report:  # fmt: skip
    """Compare the runs of ``experiments``; write the report folder; return the aggregates.
    ``metrics`` defaults to those ``research.metrics.REPORTED`` lists."""
    metrics = metrics or tuple(spec.name for spec in M.REPORTED)
    runs = load_runs(uri, experiments, where)
    if not runs:
        raise ValueError(
            f"compare: no runs in {', '.join(experiments)}" + (f" matching {where}" if where else "")
        )
    runs, notes = like_with_like(runs, all_configs)
    notes.append(what_it_compares(runs))
    arms = sorted({r.arm for r in runs})
    if baseline is not None and baseline not in arms:
        raise ValueError(f"--baseline '{baseline}' is not an arm here; the arms: {', '.join(arms)}")
    recorded = next((r.baseline for r in runs if r.baseline), None)
    if baseline is None and recorded is not None and recorded not in arms:
        notes.append(f"the grid's baseline '{recorded}' has no runs here: deltas are against '{arms[0]}'")
        recorded = None
    baseline = baseline or recorded or arms[0]
    summaries = summarise(runs, metrics, baseline)
    title = " + ".join(experiments) + (
        f" ({', '.join(f'{k}={v}' for k, v in where.items())})" if where else ""
    )
    means, deltas = tables(summaries, metrics, baseline)
    failures = [f"{s.arm} {f}" for s in summaries for f in s.failures]
    failures += [
        f"{s.arm} seed {seed}: routing collapsed (tag {T.MOE_COLLAPSED}): every token of a layer went to "
        "the same experts, so its numbers do not describe the arm's config"
        for s in summaries
        for seed in s.collapsed
    ]

    out = out or stamped(Path("reports") / "_".join(experiments))
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_curves(_curves(uri, runs), out / "val_curves.png")]
    plots += [p for p in (plot_pareto(summaries, out / "pareto.png"),
                          plot_expert_loads(uri, runs, out / "expert_load.png")) if p]  # fmt: skip
    tables_ = [("Mean ± std over seeds", means), ("Delta vs baseline (95% CI, Welch t-test)", deltas)]
    write_report(out, title, tables_, failures, plots, notes)
    export(out, runs, summaries)
    if show:
        captions = (f"{title}: mean ± std over seeds", "delta vs baseline [95% CI] Welch p")
        print_tables(list(zip(captions, (means, deltas), strict=True)), failures)
        print("\n".join(notes))
        print(f"report: {out}/report.html")
    if log_to_mlflow:
        _log_report(uri, experiments[0], out, title, [r.run_id for r in runs])
    return Report(out, summaries, runs)


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
