"""Optuna sweeps through the CLI: shared storage, resume, pruning, several objectives, bad specs."""

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from tests.cli_helpers import run_lab

TINY = ["model=tiny", "precision=fp32", "data.seq_len=32", "data.batch_size=2", "data.val_tokens=256",
        "trainer.max_steps=4", "trainer.val_every=2", "trainer.log_every=1", "trainer.checkpoint_every=100",
        "trainer.perf_warmup_steps=1", "trainer.progress_bar=false"]  # fmt: skip
LR = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
BPB = [{"metric": "val/bpb", "direction": "minimize"}]


def write_sweep(cwd, name, **spec):
    spec.setdefault("objectives", BPB)
    spec.setdefault("space", LR)
    spec.setdefault("overrides", TINY)
    (cwd / "sweeps").mkdir(exist_ok=True)
    (cwd / "sweeps" / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def trials(storage, name, states=None):
    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.trials if states is None or t.state.name in states]


def child_runs(cwd, name):
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns.db'}")
    exp = client.get_experiment_by_name(f"sweep_{name}")
    every = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in every if r.data.tags.get("lab.kind") == "sweep"]
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


NO_POSTGRES = "needs a PostgreSQL server: .ci/run starts one (cluster/postgres.sh start)"


@pytest.mark.skipif(not os.environ.get("LAB_TEST_POSTGRES_URL"), reason=NO_POSTGRES)
def test_two_workers_share_one_postgres_study(tmp_path, shared_cache):
    name = f"pg_{uuid.uuid4().hex[:8]}"
    url = os.environ["LAB_TEST_POSTGRES_URL"]
    write_sweep(tmp_path, name, sampler={"name": "random", "seed": 0}, budget={"n_trials": 6})
    proc = run_lab(tmp_path, "sweep", name, "--workers", "2", "--storage", url)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    done = trials(url, name)
    assert len(done) == 6 and sorted(t.number for t in done) == list(range(6))
    assert {t.state.name for t in done} == {"COMPLETE"}
    parent, children = child_runs(tmp_path, name)
    assert len(children) == 6
    assert {c.data.tags["optuna.trial"] for c in children} == {str(i) for i in range(6)}
    assert {t.user_attrs["mlflow_run_id"] for t in done} == {c.info.run_id for c in children}
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/complete"] == 6


def test_a_stopped_sqlite_study_resumes_to_its_budget(tmp_path, shared_cache):
    write_sweep(tmp_path, "resume", sampler={"name": "random", "seed": 1}, budget={"n_trials": 4},
                overrides=[*TINY, "trainer.max_steps=6"])  # fmt: skip
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "LAB_CACHE_DIR": os.environ.get("LAB_CACHE_DIR", str(tmp_path / "cache"))}
    # Ctrl-C as in a terminal: a test run started in the background inherits SIGINT ignored.
    ctrl_c = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    args = [sys.executable, "-m", "research.cli", "sweep", "resume"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=ctrl_c)  # fmt: skip
    deadline = time.time() + 300
    # One worker runs trials in turn: trial 2's folder appearing means two are done. (Peeking at the
    # study's database instead can miss its moments under load, when the writer holds the lock.)
    third = tmp_path / "sweeps_out" / "resume" / "trial_2"
    while time.time() < deadline and proc.poll() is None and not third.exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    stopped = len(trials(storage, "resume", {"COMPLETE"}))
    assert 2 <= stopped < 4, "the sweep was not stopped midway"

    again = run_lab(tmp_path, "sweep", "resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{stopped} of 4 trials done" in again.stdout
    assert len(trials(storage, "resume", {"COMPLETE"})) == 4


def test_diverging_learning_rates_are_pruned_before_their_last_step(tmp_path, shared_cache):
    write_sweep(
        tmp_path, "prune",
        space={"optim.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}},
        enqueue=[{"optim.lr": 3e-3}, {"optim.lr": 5e-3}, {"optim.lr": 4.0}, {"optim.lr": 8.0}],
        sampler={"name": "random", "seed": 0},
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        budget={"n_trials": 4}, overrides=[*TINY, "trainer.max_steps=8", "optim.warmup_steps=0"],
    )  # fmt: skip
    proc = run_lab(tmp_path, "sweep", "prune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_lr = {t.params["optim.lr"]: t for t in trials(f"sqlite:///{tmp_path / 'optuna.db'}", "prune")}
    assert by_lr[3e-3].state.name == by_lr[5e-3].state.name == "COMPLETE"
    for lr in (4.0, 8.0):
        t = by_lr[lr]
        assert t.state.name == "PRUNED", (lr, t.state, t.intermediate_values)
        assert max(t.intermediate_values) < 8  # stopped before the budget's last step
    _, children = child_runs(tmp_path, "prune")
    states = sorted((c.data.tags["optuna.state"], c.info.status) for c in children)
    assert states == [("COMPLETE", "FINISHED")] * 2 + [("PRUNED", "KILLED")] * 2


def test_two_objectives_give_a_pareto_set_and_its_plot(tmp_path, shared_cache):
    write_sweep(
        tmp_path, "pareto",
        objectives=[*BPB, {"metric": "perf/tokens_per_s", "direction": "maximize"}],
        space={"attention": {"type": "categorical", "choices": ["mha", "mla"]}, **LR},
        sampler={"name": "nsga2", "seed": 0, "population_size": 4}, budget={"n_trials": 4},
    )  # fmt: skip
    proc = run_lab(tmp_path, "sweep", "pareto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4 and study.best_trials
    assert "Pareto set" in proc.stdout
    (report,) = (tmp_path / "reports" / "sweep_pareto").iterdir()
    assert (report / "pareto_front.png").stat().st_size > 5000
    assert "pareto_front" in (report / "report.html").read_text()


BAD = {
    "low_above_high": (dict(space={"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}}),
                       "error: space.optim.lr.low=0.1 is not allowed; allowed: less than high=0.01"),
    "unknown_metric": (dict(objectives=[{"metric": "val/acc", "direction": "maximize"}]),
                       "error: objectives[0].metric='val/acc' is not allowed"),
    "unknown_choice": (dict(space={"attention": {"type": "categorical", "choices": ["mha", "flash"]}}),
                       "error: space.attention.choices='flash' is not allowed; allowed: gqa, mha, mla"),
    "pruner_two_objectives": (
        dict(objectives=[*BPB, {"metric": "perf/tokens_per_s", "direction": "maximize"}],
             pruner={"name": "median"}),
        "error: pruner.name='median' is not allowed; allowed: none (Optuna prunes single-objective"),
    "key_no_config_has": (dict(space={"balance.gamm": {"type": "float", "low": 0.001, "high": 0.01}},
                               budget={"n_trials": 2}),
                          "error: sweep 'key_no_config_has' space: balance.gamm=0.001: no such key; "
                          "did you mean balance.gamma="),
    "value_out_of_range": (dict(space={"optim.lr": {"type": "float", "low": -1.0, "high": 0.01}},
                                budget={"n_trials": 2}),
                           "error: sweep 'value_out_of_range' space: optim.lr=-1.0 is not allowed"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_search_space_fails_in_one_line_before_any_trial(tmp_path, case):
    spec, message = BAD[case]
    write_sweep(tmp_path, case, **spec)
    proc = run_lab(tmp_path, "sweep", case)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (tmp_path / "optuna.db").exists()


BAD_OPTIONS = [
    ("--trials 0", "error: --trials=0 is not allowed; allowed: a positive integer"),
    (
        "--storage mysql://u:secret@h/db",
        "error: storage='mysql://u:***@h/db' is not allowed; allowed: sqlite:///",
    ),
    ("--storage optuna.db", "error: storage='optuna.db' is not allowed; allowed: sqlite:///FILE.db,"),
    ("--trails 3", "error: --trails: not an option of lab sweep; its options: --help, --list, --storage,"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[o for o, _ in BAD_OPTIONS])
def test_bad_sweep_options_fail_in_one_line_before_any_trial(tmp_path, options, message):
    write_sweep(tmp_path, "opts", budget={"n_trials": 2})
    proc = run_lab(tmp_path, "sweep", "opts", *options.split())
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "secret" not in proc.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlruns.db").exists()


def test_a_sweep_where_no_trial_completed_exits_non_zero(tmp_path, shared_cache):
    write_sweep(tmp_path, "allfail", budget={"n_trials": 2}, overrides=[*TINY, "data.seq_len=10000000"])
    proc = run_lab(tmp_path, "sweep", "allfail")  # passes the pre-check: the corpus's size is read later
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: no trial of study 'allfail' completed (2 failed)" in proc.stderr


def test_a_sweep_with_a_failed_trial_exits_non_zero_and_names_what_is_left(tmp_path, shared_cache):
    seq_len = {"data.seq_len": {"type": "categorical", "choices": [32, 10000000]}}
    write_sweep(tmp_path, "somefail", budget={"n_trials": 2}, space=seq_len,
                enqueue=[{"data.seq_len": 32}, {"data.seq_len": 10000000}])  # fmt: skip
    proc = run_lab(tmp_path, "sweep", "somefail")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: study 'somefail' has 1 of 2 trials done (1 failed" in proc.stderr
    parent, children = child_runs(tmp_path, "somefail")
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
