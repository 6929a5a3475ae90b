"""The table printed when a grid ends: each arm's quality, speed and memory, read back from MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from research import metrics as M

COLUMNS = ((M.VAL_BPB, "val/bpb", "{:.4f}"), (M.TOKENS_PER_S, "tokens/s", "{:,.0f}"),
           (M.PEAK_MEM_GIB, "peak GiB", "{:.2f}"), (M.MAXVIO_GLOBAL, "MaxVio", "{:.3f}"),
           (M.KV_CACHE_BYTES_PER_TOKEN, "KV B/token", "{:,.0f}"))  # fmt: skip


def grid_runs(uri: str, experiment: str, run_dir_prefix: str) -> list[Any]:
    """The MLflow runs whose run folder lies under ``run_dir_prefix`` (one grid's jobs)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    return sorted((r for r in runs if r.data.tags.get("run_dir", "").startswith(run_dir_prefix)),
                  key=lambda r: r.info.start_time)  # fmt: skip


def print_table(runs: list[Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("arm")
    table.add_column("status")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    overrides = [r.data.tags.get("overrides", "").split() for r in runs]
    common = set.intersection(*map(set, overrides)) if runs else set()
    for r, arm in zip(runs, overrides, strict=True):
        values = [
            fmt.format(r.data.metrics[key]) if key in r.data.metrics else "-" for key, _, fmt in COLUMNS
        ]
        label = " ".join(o for o in arm if o not in common) or r.info.run_name  # what tells the arms apart
        table.add_row(label, r.info.status, *values)
    console = Console()
    console.width = max(console.width, 110)  # a pipe or CI log reports 80 columns; arms need more
    console.print(table)


class GridSummary(Callback):
    """Hydra callback: after a multirun, print the table of its runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        runs = grid_runs(config.tracking.uri, config.tracking.experiment, sweep_dir)
        print_table(
            runs, f"{config.ablation}: {len(runs)} runs in {sweep_dir} (MLflow {config.tracking.uri})"
        )
