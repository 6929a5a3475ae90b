"""A sweep's answer: the best trial (or the Pareto set), every trial, and Optuna's plots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import optuna

from research.experiments.report import Rows, print_tables, write_report
from research.experiments.sweep_spec import SweepSpec
from research.tracking import store

matplotlib.use("Agg")
STATES = ("COMPLETE", "PRUNED", "FAIL")


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_rows(trials: list[optuna.trial.FrozenTrial], spec: SweepSpec) -> Rows:
    keys = list(spec.space)
    rows = [["trial", "state", *keys, *[m for m, _ in spec.objectives], "mlflow run"]]
    for t in trials:
        values = [_fmt(v) for v in t.values] if t.values else ["-"] * len(spec.objectives)
        rows.append([str(t.number), t.state.name, *[_fmt(t.params.get(k, "-")) for k in keys], *values,
                     t.user_attrs.get("mlflow_run_id", "-")[:12]])  # fmt: skip
    return rows


def _save(axes: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    panels = np.atleast_1d(axes).ravel()
    fig = panels[0].figure
    fig.set_size_inches(max(fig.get_size_inches()[0], 7, 4 * len(panels)), max(fig.get_size_inches()[1], 4.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(study: optuna.Study, spec: SweepSpec, out: Path) -> list[Path]:
    """Optimisation history, parameter importances and slices per objective; Pareto front."""
    from optuna.visualization import matplotlib as vis

    made = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        if len(spec.objectives) > 1 and complete:
            names = [m for m, _ in spec.objectives]
            made.append(_save(vis.plot_pareto_front(study, target_names=names), out / "pareto_front.png"))
        for i, (metric, _) in enumerate(spec.objectives):
            slug = metric.replace("/", "_")

            def target(t: optuna.trial.FrozenTrial, i: int = i) -> float:
                return t.values[i]

            if complete:
                made.append(_save(vis.plot_optimization_history(study, target=target, target_name=metric),
                                  out / f"history_{slug}.png"))  # fmt: skip
                made.append(
                    _save(vis.plot_slice(study, target=target, target_name=metric), out / f"slice_{slug}.png")
                )
            if len(complete) >= 2:
                try:
                    axes = vis.plot_param_importances(study, target=target, target_name=metric)
                    made.append(_save(axes, out / f"importance_{slug}.png"))
                except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. no parameter varied yet
                    pass
    return made


def report_sweep(study: optuna.Study, spec: SweepSpec, uri: str, parent_run_id: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trials = sorted(study.trials, key=lambda t: t.number)
    counts = {s: sum(t.state.name == s for t in trials) for s in STATES}
    all_rows = trial_rows(trials, spec)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(spec.objectives) == 1:
        best = [study.best_trial] if complete else []
        heading = f"Best trial ({spec.objectives[0][1]} {spec.objectives[0][0]})"
    else:
        best = sorted(study.best_trials, key=lambda t: t.number) if complete else []
        heading = "Pareto set (" + ", ".join(f"{d} {m}" for m, d in spec.objectives) + ")"
    best_rows = trial_rows(best, spec)
    title = f"sweep {spec.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    tables = [(heading, best_rows), ("All trials", all_rows)]
    write_report(out, title, tables, [], plots(study, spec, out))
    print_tables([(title, all_rows), (heading, best_rows)])
    print(f"report: {out}/report.html")

    client = store.client(uri)
    for state, n in counts.items():
        client.log_metric(parent_run_id, f"trials/{state.lower()}", n)
    if len(spec.objectives) == 1 and best:
        client.log_metric(parent_run_id, f"best/{spec.objectives[0][0]}", best[0].values[0])
        for k, v in best[0].params.items():
            client.set_tag(parent_run_id, f"best.{k}", str(v))
    pareto = [{"trial": t.number, "params": t.params, "values": t.values} for t in best]
    (out / "best_trials.json").write_text(json.dumps(pareto, indent=2, default=str))
    client.log_artifacts(parent_run_id, str(out))
    client.set_terminated(parent_run_id, "FINISHED")
