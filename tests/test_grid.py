"""Grids end to end: launch, skip what finished, survive failures, compare with error bars."""

import json
import math
import re
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats

from research import metrics as M
from research.experiments.compare import compare, load_ratios
from research.experiments.significance import welch
from research.tracking import tags as T
from tests.cli_helpers import run_lab, runs

TINY_GRID = """\
# @package _global_
defaults:
  - override /model: tiny
  - override /precision: fp32
ablation: {name}
data: {{seq_len: 32, batch_size: 2, val_tokens: 256}}
trainer: {{max_steps: 4, val_every: 2, log_every: 1, checkpoint_every: 2, perf_warmup_steps: 1}}
grid:
{grid}
"""


def write_grid(cwd, name, grid):
    (cwd / "ablations").mkdir(exist_ok=True)
    (cwd / "ablations" / f"{name}.yaml").write_text(
        TINY_GRID.format(name=name, grid=textwrap.indent(grid, "  "))
    )


def finished_runs(cwd, name):
    return [r for r in runs(cwd, name) if T.KIND not in r.data.tags]


@pytest.fixture(scope="module")
def grid_2x2(tmp_path_factory, shared_cache):
    cwd = tmp_path_factory.mktemp("grid2x2")
    write_grid(cwd, "g2x2", "params: {attention: [mha, mla], ffn: [dense, moe]}\nseeds: [0, 1]\n"
                            "baseline: attention=mha ffn=dense")  # fmt: skip
    proc = run_lab(cwd, "grid", "g2x2", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, proc


def test_grid_runs_every_arm_and_seed_and_prints_the_comparison(grid_2x2):
    cwd, proc = grid_2x2
    recorded = finished_runs(cwd, "g2x2")
    assert len(recorded) == 8 and {r.info.status for r in recorded} == {"FINISHED"}
    assert {(r.data.tags["arm"], r.data.params["seed"]) for r in recorded} == {
        (f"attention={a} ffn={f}", s) for a in ("mha", "mla") for f in ("dense", "moe") for s in "01"
    }
    assert "delta vs baseline" in proc.stdout and "attention=mla ffn=moe" in proc.stdout
    logs = sorted((cwd / "multirun" / "g2x2").glob("*/*/log.txt"))
    assert len(logs) == 8
    for log in logs:  # no terminal there: the progress as plain lines
        text = log.read_text()
        assert re.search(r"^step 1/4  loss \d+\.\d{4}  [\d,]+ tok/s  ETA \d+m\d\ds$", text, re.M), text
        assert re.search(r"^step 4/4  loss .* ETA 0m00s$", text, re.M), text
        assert re.search(r"^step 2/4  val/bpb \d+\.\d{4}$", text, re.M), text


def test_compare_aggregates_match_mlflow_raw_metrics(grid_2x2, tmp_path):
    cwd, _ = grid_2x2
    uri = f"sqlite:///{cwd / 'mlruns.db'}"
    report = compare(["g2x2"], uri=uri, out=tmp_path / "report", show=False, log_to_mlflow=False)
    by_arm = {}
    for r in sorted(finished_runs(cwd, "g2x2"), key=lambda r: int(r.data.params["seed"])):
        by_arm.setdefault(r.data.tags["arm"], []).append(r.data.metrics)  # in seed order: pairs
    base = by_arm["attention=mha ffn=dense"]
    for s in report.summaries:
        raw = by_arm[s.arm]
        for metric in (M.VAL_BPB, M.TOKENS_PER_S, M.PEAK_MEM_GIB):
            values = [m[metric] for m in raw]
            assert s.stats[metric].mean == pytest.approx(np.mean(values), rel=1e-12)
            assert s.stats[metric].std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
            if s.arm != "attention=mha ffn=dense":
                d = s.deltas[metric]
                assert d.delta == pytest.approx(
                    np.mean(values) - np.mean([m[metric] for m in base]), rel=1e-12
                )
                base_values = [m[metric] for m in base]
                if np.ptp(np.subtract(values, base_values)) > 0:  # the seeds pair: the paired test
                    assert d.test == "paired t"
                    assert d.p_value == pytest.approx(stats.ttest_rel(values, base_values).pvalue)
        assert (M.MAXVIO_GLOBAL in s.stats) == ("moe" in s.arm)
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.html", "summary.md", "runs.csv", "summary.json", "val_curves.png", "pareto.png",
            "expert_load.png"} <= files  # fmt: skip
    exported = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {s["arm"] for s in exported} == set(by_arm)
    assert len((tmp_path / "report" / "runs.csv").read_text().splitlines()) == 9


def test_compare_filters_and_logs_the_report_to_mlflow(grid_2x2, tmp_path):
    cwd, _ = grid_2x2
    uri = f"sqlite:///{cwd / 'mlruns.db'}"
    only_mla = compare(["g2x2"], uri=uri, where={"attention.name": "mla"}, out=tmp_path / "mla", show=False)
    assert {s.arm for s in only_mla.summaries} == {"attention=mla ffn=dense", "attention=mla ffn=moe"}
    moved = "baseline &#x27;attention=mha ffn=dense&#x27; has no runs here: deltas are against"
    assert moved in (only_mla.folder / "report.html").read_text()  # filtered out: the deltas say whose
    with pytest.raises(ValueError, match="--baseline 'attention=x' is not an arm here; the arms: attention="):
        compare(["g2x2"], uri=uri, baseline="attention=x", show=False)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("g2x2")
    reports = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(T.KIND) == "report"]
    assert reports and "report.html" in {a.path for a in client.list_artifacts(reports[0].info.run_id)}
    compare(["g2x2"], uri=uri, where={"attention.name": "mla"}, out=tmp_path / "mla again", show=False)
    again = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(T.KIND) == "report"]
    assert len(again) == len(reports)  # the same runs compared again: their report run, updated
    with pytest.raises(ValueError, match="no MLflow experiment 'nope'"):
        compare(["nope"], uri=uri, show=False)


def test_report_renders_in_headless_chromium(grid_2x2, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium installed (.ci/run installs Debian's chromium)")
    cwd, _ = grid_2x2
    report = compare(["g2x2"], uri=f"sqlite:///{cwd / 'mlruns.db'}", out=tmp_path / "r", show=False,
                     log_to_mlflow=False)  # fmt: skip
    page = (report.folder / "report.html").read_text()
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        "document.body.dataset.images = imgs.length;"
        "document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
        "document.body.dataset.tables = document.querySelectorAll('table tbody tr').length; });</script>"
    )
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
    ]  # fmt: skip
    dump = [chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", f"file://{tmp_path / 'probe.html'}"]
    dom = subprocess.run(dump, capture_output=True, text=True, timeout=120)
    found = dict(re.findall(r'data-(images|loaded|tables)="(\d+)"', dom.stdout))
    assert found, dom.stderr[-2000:]
    assert int(found["images"]) == 3 and found["loaded"] == found["images"]
    # a row per arm; a delta row per non-baseline arm; its val/bpb evidence (the baseline, dense, has
    # no MaxVio to test against); what each arm trained
    assert int(found["tables"]) == 4 + 3 + 3 + 4
    shot = report.folder / "screenshot.png"
    page_url = f"file://{report.folder / 'report.html'}"
    subprocess.run(
        [chromium, *flags, "--window-size=1280,2400", f"--screenshot={shot}", page_url], timeout=120
    )
    assert shot.stat().st_size > 10_000


def test_failed_arm_is_recorded_reported_and_rerun_while_finished_arms_are_skipped(tmp_path, shared_cache):
    write_grid(tmp_path, "gfail", "arms: {plain: [], gqa: [attention=gqa], diverges: [model.init_std=1e30]}\n"
                                  "seeds: [0]\nbaseline: plain")  # fmt: skip
    first = run_lab(tmp_path, "grid", "gfail")
    assert first.returncode == 1, first.stderr[-3000:]  # scripts and CI can tell
    assert "error: 1 run(s) failed: diverges seed=0" in first.stderr
    recorded = {r.data.tags["arm"]: r for r in finished_runs(tmp_path, "gfail")}
    assert recorded["plain"].info.status == recorded["gqa"].info.status == "FINISHED"
    assert recorded["diverges"].info.status == "FAILED"
    assert "loss is nan" in recorded["diverges"].data.tags["failure_reason"]
    assert "failed: diverges seed=0: run failed: TrainingDiverged" not in first.stdout
    assert "FAILED" in first.stdout and "diverges" in first.stdout  # the table lists it
    report = compare(["gfail"], uri=f"sqlite:///{tmp_path / 'mlruns.db'}", out=tmp_path / "r", show=False)
    failed = next(s for s in report.summaries if s.arm == "diverges")
    assert failed.failed == 1 and failed.finished == 0 and "loss is nan" in failed.failures[0]
    assert "Failed runs" in (tmp_path / "r" / "report.html").read_text()

    again = run_lab(tmp_path, "grid", "gfail")
    assert "3 runs, 2 already finished" in again.stdout
    arms = [r.data.tags["arm"] for r in finished_runs(tmp_path, "gfail")]
    assert sorted(arms) == ["diverges", "diverges", "gqa", "plain"]  # only the failed arm ran again


def test_every_arm_is_checked_before_any_starts_and_one_failing_at_start_is_recorded(tmp_path, shared_cache):
    write_grid(tmp_path, "gbadp", "params: {attention: [mha, foo]}")
    proc = run_lab(tmp_path, "grid", "gbadp")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: arm 'attention=foo': " in proc.stderr and "attention=foo" in proc.stderr
    write_grid(
        tmp_path,
        "gbad",
        "arms: {plain: [attention=gqa], bad: [attention=gqa, model.n_kv_heads=3]}\nseeds: [0]",
    )
    proc = run_lab(tmp_path, "grid", "gbad")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: arm 'bad': " in proc.stderr and "n_kv_heads" in proc.stderr
    assert runs(tmp_path, "gbad") == []  # the good first arm did not train either

    write_grid(tmp_path, "glate", "arms: {plain: [], long: [data.seq_len=10000000]}\nseeds: [0]")
    proc = run_lab(tmp_path, "grid", "glate")  # the corpus's size is known only once it is read
    assert proc.returncode == 1
    recorded = {r.data.tags["arm"]: r for r in finished_runs(tmp_path, "glate")}
    assert recorded["plain"].info.status == "FINISHED" and recorded["long"].info.status == "FAILED"
    assert "data.seq_len=10000000 is not allowed" in recorded["long"].data.tags["failure_reason"]
    assert "long" in proc.stdout and "FAILED" in proc.stdout  # in the comparison, not missing from it


def test_parallel_runs_share_one_sqlite_store_and_lose_nothing(tmp_path, shared_cache):
    write_grid(tmp_path, "gpar", "params: {attention: [mha]}\nseeds: [0, 1, 2, 3]")
    proc = run_lab(tmp_path, "grid", "gpar", "--jobs", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = finished_runs(tmp_path, "gpar")
    assert len(recorded) == 4 and {r.info.status for r in recorded} == {"FINISHED"}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    for r in recorded:
        assert {M.TRAIN_LOSS, M.VAL_BPB, M.TOKENS_PER_S, M.PEAK_MEM_GIB} <= set(r.data.metrics)
        assert [m.step for m in client.get_metric_history(r.info.run_id, M.TRAIN_LOSS)] == [0, 1, 2, 3]
        assert len(client.get_metric_history(r.info.run_id, M.VAL_BPB)) == 2


def test_unknown_grid_and_bad_where_fail_in_one_line(tmp_path):
    proc = run_lab(tmp_path, "grid", "nonexistent")
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: grid='nonexistent' is not allowed; allowed:"
    )
    proc = run_lab(tmp_path, "compare", "x", "--where", "model.name")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --where 'model.name' is not KEY=VALUE"
    refused = [
        ("trainer.max_stpes=3", "error: trainer.max_stpes=3: no such key; did you mean trainer.max_steps=3?"),
        ("--jobs 0", "error: --jobs=0 is not allowed; allowed: 1 or more"),
        ("--gpus 0,a", "error: --gpus=0,a: 'a' is not a GPU; allowed: indices or UUIDs, comma-separated"),
        ("--cfg job", "error: --cfg: not an option of lab grid; its options: --gpus, --help, --jobs,"),
    ]
    for args, line in refused:
        proc = run_lab(tmp_path, "grid", "quick", *args.split())
        assert proc.returncode == 2 and proc.stderr.startswith(line), proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "multirun").exists()


def test_the_expert_load_scale_reaches_a_collapsed_layer():
    balanced = np.full((2, 8), 100.0)
    collapsed = np.array([[400.0, 400.0, 0, 0, 0, 0, 0, 0], [100.0] * 8])  # top-2 of 8: 4x the mean
    ratios, top = load_ratios({"even": balanced, "collapsed": collapsed})
    np.testing.assert_allclose(ratios["even"], 1.0)
    assert ratios["collapsed"][0, 0] == 4.0 and top == 4.0  # not clipped at 2
    assert load_ratios({"even": balanced})[1] == 2.0


def test_welch_interval():
    a, b = [1.0, 1.2, 0.9, 1.1], [0.5, 0.7, 0.6]
    d = welch(a, b)
    assert d.delta == pytest.approx(np.mean(a) - np.mean(b))
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    dof = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    assert (d.ci_low, d.ci_high) == pytest.approx((d.delta - half, d.delta + half))
    assert d.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert math.isnan(welch([1.0], [2.0, 3.0]).ci_low)


def test_a_run_killed_hard_is_closed_as_failed(tmp_path):
    from omegaconf import OmegaConf

    from research.experiments.grid import Job, _record_failure

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("killed")
    job_dir = tmp_path / "multirun" / "0"
    job_dir.mkdir(parents=True)
    orphan = client.create_run(exp, tags={"run_dir": str(job_dir.resolve())})
    neighbour = client.create_run(exp, tags={"run_dir": str(tmp_path / "multirun" / "1")})
    cfg = OmegaConf.create(
        {"tracking": {"uri": uri, "experiment": "killed"}, "ablation": "killed", "grid": {}}
    )
    _record_failure(cfg, Job(0, "a", 0, run_dir=job_dir), "FAILED (exit code -9)")
    closed = client.get_run(orphan.info.run_id)
    assert closed.info.status == "FAILED"
    assert closed.data.tags["failure_reason"] == "job ended FAILED (exit code -9)"
    assert client.get_run(neighbour.info.run_id).info.status == "RUNNING"


@pytest.mark.parametrize("name", ["attention", "balance", "moe_granularity", "mtp", "precision", "quick",
                                  "v3_replication"])  # fmt: skip
def test_every_shipped_grid_composes_and_each_arm_builds(name):
    from research.experiments.grid import available, compose_grid, expand
    from research.training.preflight import precheck

    assert name in available()
    cfg = compose_grid(name, [])
    jobs = expand(name, cfg, [])
    assert jobs and len({j.arm for j in jobs}) >= 2
    for job in {j.arm: j for j in jobs}.values():
        # fp8_rowwise needs torchao and a GPU: its arm is checked with the default precision here.
        overrides = [o for o in job.overrides if o != "precision=fp8_rowwise"]
        assert precheck(overrides) is None, job.arm


def test_named_arms_cross_with_params():
    """grid.arms and grid.params together: every named arm with every combination (the gate's grid)."""
    from research.experiments.grid import arms, compose_grid

    got = arms(compose_grid("quality_gate", []))
    assert len(got) == 5 * 2
    assert got["mha dense speed=plain"] == ["attention=mha", "ffn=dense", "balance=none", "speed=plain"]
    assert got["mla moe aux_free speed=auto"][-1] == "speed=auto"


def test_a_relaunch_resumes_only_from_folders_under_the_grids_own_output(tmp_path, monkeypatch):
    import torch

    from research.experiments.grid import _previous_runs

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("g")
    inside, outside = tmp_path / "multirun" / "g" / "t" / "0", tmp_path / "elsewhere"
    for folder, h in ((inside, "h-in"), (outside, "h-out")):
        (folder / "checkpoints").mkdir(parents=True)
        torch.save(
            {"state_dict": {}, "global_step": 2, "config_hash": h}, folder / "checkpoints" / "last.ckpt"
        )
        client.create_run(exp, tags={"run_dir": str(folder), "config_hash": h})
    _, unfinished = _previous_runs(uri, "g", tmp_path / "multirun" / "g")
    assert unfinished == {"h-in": inside.resolve()}  # a tag pointing elsewhere is not followed


def test_an_unfinished_run_with_nothing_to_resume_is_closed_as_killed(tmp_path, monkeypatch):
    from research.experiments.grid import _previous_runs

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("g")
    folder = tmp_path / "multirun" / "g" / "t" / "0"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"cut short by the kill")
    run = client.create_run(exp, tags={"run_dir": str(folder), "config_hash": "h"})
    assert _previous_runs(uri, "g", tmp_path / "multirun" / "g") == (set(), {})
    closed = client.get_run(run.info.run_id)
    assert (
        closed.info.status == "KILLED" and "killed before a checkpoint" in closed.data.tags["killed_reason"]
    )


def test_compare_never_puts_runs_of_another_config_in_one_table(tmp_path, shared_cache):
    write_grid(tmp_path, "gmix", "params: {attention: [mha, mla]}\nseeds: [0]\nbaseline: attention=mha")
    assert run_lab(tmp_path, "grid", "gmix").returncode == 0
    # The same grid again on another corpus, for fewer steps: a new user's second launch.
    book = tmp_path / "book.txt"
    book.write_text("".join(f"Chapter {i}. The tide came in over the flats and went out again.\n"
                            for i in range(600)))  # fmt: skip
    text = ["data=text", f"data.path={book}", "data.val_fraction=0.5"]
    again = run_lab(tmp_path, "grid", "gmix", *text, "trainer.max_steps=6")
    assert again.returncode == 0, again.stderr[-3000:]
    left_out = next(line for line in again.stdout.splitlines() if "of another config left out" in line)
    assert left_out.startswith("gmix: 2 run(s) of another config left out (data.path=None there, ")
    assert "data.source='stdlib' there, 'text' here" in left_out
    assert f"compares: corpus text {book}, tokenizer byte, 6 steps (384 tokens), model tiny" in again.stdout
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    newest = compare(["gmix"], uri=uri, out=tmp_path / "r1", show=False, log_to_mlflow=False)
    assert {s.arm: s.finished for s in newest.summaries} == {"attention=mha": 1, "attention=mla": 1}
    assert all(r.params["data.source"] == "text" for r in newest.runs)
    every = compare(["gmix"], uri=uri, out=tmp_path / "r2", show=False, log_to_mlflow=False, all_configs=True)
    assert len(every.summaries) == 4 and all(s.finished == 1 for s in every.summaries)
    assert "another config left out" in (tmp_path / "r1" / "report.html").read_text()
