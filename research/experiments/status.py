"""``lab status NAME``: each job of a grid's or sweep's newest submission, its launcher state and
MLflow run."""

from __future__ import annotations

from pathlib import Path

from research.launch import Submitted, current_records, launcher_named
from research.tracking import store
from research.tracking import tags as T


def status(name: str, uri: str | None = None) -> list[dict[str, str]]:
    """Each job of ``current_records(name)``: its launcher's state and MLflow run."""
    records = current_records(name)
    jobs = [(record["kind"], Submitted(**j)) for record in records for j in record["jobs"]]
    launcher = launcher_named(records[-1].get("launcher", "slurm"))  # records before it were Slurm's
    states = launcher.status([j.job_id for _, j in jobs])
    client = store.client(uri or "sqlite:///mlruns.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    rows = []
    for kind, j in jobs:
        query = (
            f"tags.`{T.JOB_ID}` = '{j.job_id}'"
            if kind == "sweep"
            else f"tags.`{T.RUN_DIR}` = '{Path(j.run_dir).resolve()}'"
        )
        runs = client.search_runs(experiments, query)
        rows.append({"job": j.job_id, "what": j.label, "state": states.get(j.job_id, "UNKNOWN"),
                     "runs": " ".join(f"{r.info.run_id[:8]} {r.info.status}" for r in runs) or "-",
                     "log": j.log})  # fmt: skip
    return rows


def print_status(name: str, uri: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = status(name, uri)
    shown = current_records(name)
    title = (
        f"{name}: {len(shown)} runs submitted one by one"
        if len(shown) > 1
        else f"{name}: {shown[0]['submitted']}"
    )
    table = Table(title=title)
    for column in ("job", "what", "state", "runs", "log"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    Console(width=160).print(table)
