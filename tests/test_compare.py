"""The comparison's tables read each metric's label, direction and format from research.metrics."""

from research import metrics as M
from research.experiments.compare import RunRecord, summarise, tables


def run(arm: str, seed: int, **metrics: float) -> RunRecord:
    return RunRecord(run_id=f"{arm}{seed}", experiment="e", arm=arm, seed=seed, status="FINISHED", reason="",
                     metrics=metrics)  # fmt: skip


def test_a_metric_added_to_reported_is_a_column_with_its_label_direction_and_format(monkeypatch):
    name = "perf/tokens_per_joule"
    added = M.MetricSpec(name, "tokens/J", lower_is_better=False, integer=True)
    monkeypatch.setattr(M, "REPORTED", (*M.REPORTED, added))
    runs = [run("a", s, **{M.VAL_BPB: 1.5 + s / 100, name: 1000.0 + s}) for s in (0, 1)]
    runs += [run("b", s, **{M.VAL_BPB: 1.4 + s / 100, name: 3000.0 + s}) for s in (0, 1)]
    metrics = tuple(spec.name for spec in M.REPORTED)
    means, deltas = tables(summarise(runs, metrics, "a"), metrics)
    assert means[0] == ["arm", "runs", "val/bpb", "tokens/J"]  # only the columns some run recorded
    assert means[2][3] == "3,000 ± 1"  # integer format
    assert deltas[0] == ["arm", "Δ val/bpb ↓", "Δ tokens/J ↑"]
    assert deltas[1][0] == "b" and deltas[1][2].startswith("+2,000")
