"""The cluster path against a real Slurm (cluster/slurm.sh; .ci/run starts one): grids as job arrays,
time limits survived by checkpoint + requeue + resume, sweep workers as jobs; and without Slurm:
multi-process DDP, resuming after a hard kill, profiles and strategies."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from research import metrics as M
from research.launch.slurm import run_overrides, sbatch_options, wait
from research.tracking import tags as T
from research.training.data import RandomWindows
from research.training.strategies import make_strategy
from tests.cli_helpers import TINY, error_line, history, lab, run_lab, runs
from tests.test_grid import write_grid
from tests.test_sweep import trials, write_sweep


def slurm_running() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def slurm():
    if not slurm_running():
        reason = "needs a running Slurm: cluster/slurm.sh start, then export SLURM_CONF (.ci/run does both)"
        if os.environ.get("LAB_REQUIRE_SLURM"):
            pytest.fail(reason)  # CI must not skip these silently
        pytest.skip(reason)


def grid_runs(cwd, name):
    return [r for r in runs(cwd, name) if T.KIND not in r.data.tags]


def newest_record(cwd, folder, name):
    (record,) = sorted((cwd / folder / name).glob("*/jobs.json"))[-1:]
    return json.loads(record.read_text())


# --- on Slurm ----------------------------------------------------------------------------------


def test_grid_runs_as_a_job_array_and_lands_in_mlflow_with_job_ids(tmp_path, shared_cache, slurm):
    write_grid(tmp_path, "sgrid", "params: {attention: [mha, mla]}\nseeds: [0]")
    proc = run_lab(tmp_path, "grid", "sgrid", "cluster=slurm_local", "--wait")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = newest_record(tmp_path, "multirun", "sgrid")
    job_ids = {j["job_id"] for j in record["jobs"]}
    array = {j.split("_")[0] for j in job_ids}
    assert len(job_ids) == 2 and len(array) == 1  # one array, two tasks
    recorded = grid_runs(tmp_path, "sgrid")
    assert {r.info.status for r in recorded} == {"FINISHED"}
    assert {r.data.tags["slurm.job_id"] for r in recorded} == job_ids
    assert {r.data.tags["arm"] for r in recorded} == {"attention=mha", "attention=mla"}
    for job in record["jobs"]:  # each run's folder links its own Slurm log
        assert (
            "Epoch" in (tmp_path / job["run_dir"] / "slurm.err").read_text()
            or (tmp_path / job["run_dir"] / "slurm.out").exists()
        )
    status = run_lab(tmp_path, "status", "sgrid")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("COMPLETED") == 2 and status.stdout.count("FINISHED") == 2


def test_the_time_limit_warning_checkpoints_requeues_and_resumes_into_one_run(tmp_path, shared_cache, slurm):
    # Slurm sends the warning (sbatch --signal) up to a minute before it is due, so a test of a short
    # time limit would race the training's speed: here scancel sends the same signal once the run is
    # under way, and the submission is checked for asking Slurm to send it before the limit.
    write_grid(tmp_path, "slong", "params: {attention: [mha]}\nseeds: [0]")
    steps = ["data.batch_size=4", "trainer.max_steps=2000", "trainer.val_every=1000", "trainer.log_every=50",
             "trainer.checkpoint_every=1000"]  # fmt: skip
    proc = run_lab(tmp_path, "grid", "slong", *steps, "cluster=slurm_local", "cluster.signal_delay_s=30")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (job,) = newest_record(tmp_path, "multirun", "slong")["jobs"]
    script = (tmp_path / job["run_dir"]).parent / "slurm" / f"{job['job_id']}_submission.sh"
    assert {"#SBATCH --signal=USR1@30", "#SBATCH --requeue"} <= set(script.read_text().splitlines())

    def training() -> bool:
        started = grid_runs(tmp_path, "slong")
        return bool(started and history(tmp_path, started[0].info.run_id, M.TRAIN_LOSS))

    deadline = time.monotonic() + 300
    while not training():
        assert time.monotonic() < deadline, "the job logged no training step in 5 minutes"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job["job_id"]], check=True)
    assert wait([job["job_id"]], poll_s=1.0) == {job["job_id"]: "COMPLETED"}

    (run,) = grid_runs(tmp_path, "slong")  # one run, however many times the job started
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumes"] == "1" and int(run.data.tags["requeued_at_step"]) < 2000
    logged = [step for step, _ in history(tmp_path, run.info.run_id, M.TRAIN_LOSS)]
    assert logged == list(range(49, 2000, 50))  # every logged step exactly once: none lost, none repeated
    assert [s for s, _ in history(tmp_path, run.info.run_id, M.VAL_LOSS)][-1] == 2000  # after the last step
    assert (tmp_path / job["run_dir"] / "checkpoints" / "preempt.ckpt").exists()
    assert "DUE TO JOB REQUEUE" in (tmp_path / job["run_dir"] / "slurm.err").read_text()


def test_a_hard_requeue_resumes_from_the_last_checkpoint_and_records_each_step_once(tmp_path, shared_cache,
                                                                                    slurm):  # fmt: skip
    # `scontrol requeue` kills the job without the warning signal: the steps between the last
    # checkpoint and the kill were recorded, and the resumed job trains them again.
    write_grid(tmp_path, "shard", "params: {attention: [mha]}\nseeds: [0]")
    steps = ["data.batch_size=4", "trainer.max_steps=600", "trainer.val_every=300", "trainer.log_every=10",
             "trainer.checkpoint_every=100"]  # fmt: skip
    proc = run_lab(tmp_path, "grid", "shard", *steps, "cluster=slurm_local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (job,) = newest_record(tmp_path, "multirun", "shard")["jobs"]

    def logged_after_a_checkpoint() -> bool:
        started = grid_runs(tmp_path, "shard")
        ckpt = tmp_path / job["run_dir"] / "checkpoints" / "last.ckpt"
        return bool(
            started and ckpt.exists() and len(history(tmp_path, started[0].info.run_id, M.TRAIN_LOSS)) > 13
        )

    deadline = time.monotonic() + 300
    while not logged_after_a_checkpoint():
        assert time.monotonic() < deadline, "the job logged no step past its first checkpoint in 5 minutes"
        time.sleep(0.3)
    subprocess.run(["scontrol", "requeue", job["job_id"]], check=True)
    assert wait([job["job_id"]], poll_s=1.0) == {job["job_id"]: "COMPLETED"}

    (run,) = grid_runs(tmp_path, "shard")
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    for key in (M.TRAIN_LOSS, M.KV_CACHE_BYTES_PER_TOKEN, M.VAL_LOSS):
        raw = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(raw) == sorted(set(raw)), f"{key} recorded twice at a step"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, M.TRAIN_LOSS)) == list(
        range(9, 600, 10)
    )


def test_sweep_workers_run_as_slurm_jobs_and_a_last_job_reports_and_closes_the_sweep(tmp_path, shared_cache,
                                                                                      slurm):  # fmt: skip
    write_sweep(tmp_path, "ssweep", sampler={"name": "random", "seed": 0}, budget={"n_trials": 4})
    journal = tmp_path / "shared" / "study.journal"
    journal.parent.mkdir()
    proc = run_lab(tmp_path, "sweep", "ssweep", "cluster=slurm_local", "--workers", "2",
                   "--storage", f"journal:{journal}")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = newest_record(tmp_path, "sweeps_out", "ssweep")["jobs"]
    assert [j["label"] for j in jobs] == ["worker 0: 2 trials", "worker 1: 2 trials", "report"]
    states = wait([j["job_id"] for j in jobs])  # nobody runs the sweep command again
    assert set(states.values()) == {"COMPLETED"}, states
    from research.experiments.sweep import make_storage

    done = trials(make_storage(f"journal:{journal}"), "ssweep")
    assert len(done) == 4 and {t.state.name for t in done} == {"COMPLETE"}
    every = runs(tmp_path, "sweep_ssweep")
    children = [r for r in every if "optuna.trial" in r.data.tags]
    assert len(children) == 4
    workers = {j["job_id"] for j in jobs[:2]}
    assert {r.data.tags["slurm.job_id"] for r in children} == workers  # both took trials
    (parent,) = [r for r in every if r.data.tags.get("lab.kind") == "sweep"]
    assert parent.info.status == "FINISHED"
    assert list((tmp_path / "reports" / "sweep_ssweep").glob("*/report.html"))


def grid_in_background(cwd, name: str, overrides: list[str]) -> subprocess.Popen:
    """``lab grid NAME`` in its own process group (os.killpg ends the grid and its runs)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "research.cli", "grid", name, *overrides]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return subprocess.Popen(args, cwd=cwd, env=env, start_new_session=True, **quiet)


# --- without Slurm -----------------------------------------------------------------------------


def test_a_warning_signal_during_start_up_is_held_and_then_honoured(monkeypatch):
    # Slurm may signal up to a minute early, while the task still imports torch: the entry object
    # starts holding the signal as soon as it is unpickled in the task.
    import pickle

    from research import signals
    from research.launch.entry import TaskEntry

    monkeypatch.setattr(signals, "_requested", False)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        entry = pickle.loads(pickle.dumps(TaskEntry("os.path:join", "USR1")))
        os.kill(os.getpid(), signal.SIGUSR1)  # its default action would end this process
        assert signals.requested()  # held: the first step boundary checkpoints and requeues
        signals.install("USR1")
        assert signals.requested()  # the handler that takes over keeps what was held
        assert entry("a", "b") == os.path.join("a", "b")
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sqlite_storage_is_refused_for_slurm_workers(tmp_path, shared_cache):
    write_sweep(tmp_path, "nosqlite", budget={"n_trials": 2})
    proc = run_lab(tmp_path, "sweep", "nosqlite", "cluster=slurm_local", "--storage", "sqlite:///o.db")
    assert "storage='sqlite:///o.db' is not allowed" in error_line(proc)
    assert "network filesystem" in error_line(proc)
    assert not (tmp_path / "o.db").exists()  # refused before anything was written


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, shared_cache):
    common = [*TINY, "data.batch_size=4", "data.val_tokens=512", "trainer.max_steps=6", "trainer.val_every=3",
              "trainer.accelerator=cpu"]  # fmt: skip
    one = lab(tmp_path, *common, "hydra.run.dir=out/one", "tracking.run_name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = lab(tmp_path, *common, "trainer=ddp", "trainer.devices=2", "hydra.run.dir=out/two",
              "tracking.run_name=two")  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    by_name = {r.info.run_name: r for r in runs(tmp_path)}
    assert set(by_name) == {"one", "two"}  # the second rank logged nothing of its own
    val_one = history(tmp_path, by_name["one"].info.run_id, M.VAL_LOSS)
    val_two = history(tmp_path, by_name["two"].info.run_id, M.VAL_LOSS)
    assert [s for s, _ in val_one] == [s for s, _ in val_two] == [3, 6]  # after 3 and 6 steps
    for (_, a), (_, b) in zip(val_one, val_two, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)  # fp32: only the all-reduce's summation order differs
    m = by_name["two"].data.metrics
    assert m[M.TOKENS_PER_S] == pytest.approx(2 * m[M.TOKENS_PER_S_PER_GPU])
    assert m[M.PEAK_MEM_GIB_JOB] > m[M.PEAK_MEM_GIB] > 0  # two processes' memory vs the larger one
    assert by_name["two"].data.params["trainer.strategy"] == "ddp"


def test_a_hard_killed_grid_run_resumes_from_its_last_checkpoint_when_relaunched(tmp_path, shared_cache):
    write_grid(tmp_path, "killed", "params: {attention: [mha]}\nseeds: [0]")
    long = ["trainer.max_steps=400", "trainer.checkpoint_every=20", "trainer.val_every=200",
            "trainer.log_every=10"]  # fmt: skip
    first = grid_in_background(tmp_path, "killed", long)
    deadline = time.time() + 300
    while not list(tmp_path.glob("multirun/killed/*/0/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)  # grid and run die at once: nobody marks the run
    first.wait()
    (killed,) = grid_runs(tmp_path, "killed")
    assert killed.info.status == "RUNNING"
    again = run_lab(tmp_path, "grid", "killed", *long)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 resuming from a checkpoint" in again.stdout
    (run,) = grid_runs(tmp_path, "killed")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumes"] == "1"
    logged = [step for step, _ in history(tmp_path, run.info.run_id, M.TRAIN_LOSS)]
    assert logged == list(range(9, 400, 10))  # each step once, from the start to the end


def test_a_relaunch_refuses_a_run_in_training_and_replaces_one_killed_before_a_checkpoint(
    tmp_path, shared_cache
):
    write_grid(tmp_path, "early", "params: {attention: [mha]}\nseeds: [0]")
    long = ["trainer.max_steps=300", "trainer.checkpoint_every=1000", "trainer.val_every=300",
            "trainer.log_every=10"]  # fmt: skip
    first = grid_in_background(tmp_path, "early", long)
    deadline = time.time() + 300
    while not (grid_runs(tmp_path, "early") and history(tmp_path, grid_runs(tmp_path, "early")[0].info.run_id,
                                                         M.TRAIN_LOSS)):  # fmt: skip
        assert time.time() < deadline, "the run logged no step in 5 minutes"
        time.sleep(0.5)
    os.kill(first.pid, signal.SIGKILL)  # only the grid's parent: its run trains on
    first.wait()
    try:
        busy = run_lab(tmp_path, "grid", "early", *long)
        assert busy.returncode == 2 and "is being trained by pid" in error_line(busy)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # now the run too, before its first checkpoint
    time.sleep(1)
    (killed,) = grid_runs(tmp_path, "early")
    assert killed.info.status == "RUNNING"  # nobody could mark it
    again = run_lab(tmp_path, "grid", "early", *long)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    by_status = {r.info.status: r for r in grid_runs(tmp_path, "early")}
    assert set(by_status) == {"KILLED", "FINISHED"}  # one run per config left RUNNING: none
    assert by_status["KILLED"].info.run_id == killed.info.run_id
    assert "killed before a checkpoint" in by_status["KILLED"].data.tags["killed_reason"]


def test_ranks_take_disjoint_rows_that_make_up_the_one_process_batch():
    tokens = torch.arange(10_000).numpy()
    whole = next(iter(RandomWindows(tokens, 16, 8, seed=1, start_step=3)))
    parts = [next(iter(RandomWindows(tokens, 16, 8, 1, 3, rank=r, world=4))) for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match=r"data\.batch_size=6 is not allowed"):
        RandomWindows(tokens, 16, 6, seed=1, world=4)


def test_profiles_map_onto_the_allocation():
    from hydra import compose, initialize_config_module

    from research.config.compose import searchpath_override

    with initialize_config_module("research.conf", version_base="1.3"):
        h100 = compose("train", overrides=[searchpath_override(), "cluster=slurm_h100", "cluster.nodes=2"])
        local = compose("train", overrides=[searchpath_override(), "cluster=slurm_local"])
    gpu = ["trainer.accelerator=gpu", "trainer.devices=8", "trainer.num_nodes=2"]
    assert run_overrides(h100.cluster) == gpu
    assert run_overrides(local.cluster) == []  # CPU: one task, the run as configured
    assert local.cluster.partition == "debug" and local.cluster.launcher == "slurm"
    assert sbatch_options(["--exclusive", "--reservation=abl"]) == {"exclusive": True, "reservation": "abl"}
    with pytest.raises(ValueError, match=r"cluster\.sbatch"):
        sbatch_options(["exclusive"])


def test_a_sites_profile_in_the_working_folder_is_found_without_an_ablations_folder(tmp_path, monkeypatch):
    from research.config.compose import compose_run

    (tmp_path / "cluster").mkdir()
    site = (
        "defaults: [slurm_h100, _self_]\nname: mysite\npartition: cpu\nconstraint: null\ngpus_per_node: 0\n"
    )
    (tmp_path / "cluster" / "mysite.yaml").write_text(site)
    monkeypatch.chdir(tmp_path)
    cfg = compose_run(["cluster=mysite"])
    assert (
        cfg.cluster.partition == "cpu"
        and cfg.cluster.time_min == compose_run(["cluster=slurm_h100"]).cluster.time_min
    )


def test_strategies_by_name_and_bad_ones_in_one_line(tmp_path, shared_cache):
    ddp = make_strategy(OmegaConf.create({"strategy": "ddp"}))
    fsdp = make_strategy(OmegaConf.create({"strategy": "fsdp", "sharding": "SHARD_GRAD_OP"}))
    assert type(ddp).__name__ == "DDPStrategy" and type(fsdp).__name__ == "FSDPStrategy"
    bad = lab(tmp_path, *TINY, "trainer.strategy=horovod")
    assert error_line(bad).startswith("error: trainer.strategy='horovod' is not allowed; allowed: auto, ddp")
    bad = lab(tmp_path, *TINY, "trainer.deterministic=maybe")
    assert error_line(bad).startswith("error: trainer.deterministic='maybe' is not allowed; allowed: false")
    bad_profile = lab(tmp_path, *TINY, "cluster=slurm_nowhere")
    assert "slurm_nowhere" in error_line(bad_profile)


def test_routed_experts_are_an_optimiser_group_of_their_own():
    from components.moe import GroupedExperts
    from research.training.module import LitLM
    from tests.conftest import tiny_config

    optim = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "warmup_steps": 1,
             "total_steps": 10, "min_lr_ratio": 0.1}  # fmt: skip
    module = LitLM(tiny_config(ffn="moe"), optim, torch.ones(64))
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    experts = {id(p) for m in module.model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    assert {id(p) for p in groups["experts"]["params"]} == experts and experts
    assert sum(len(g["params"]) for g in groups.values()) == len(list(module.parameters()))
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["experts"]["weight_decay"] == 0.1


def test_jobs_log_to_a_tracking_server_started_by_lab_server(tmp_path, shared_cache):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = os.environ.get("LAB_TEST_POSTGRES_URL")  # cluster/postgres.sh: its `mlflow` database beside it
    backend = pg.rsplit("/", 1)[0] + "/mlflow" if pg else f"sqlite:///{tmp_path / 'server.db'}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "research.cli", "server", f"tracking.server.port={port}",
                               f"tracking.server.backend={backend}", "tracking.server.workers=1",
                               f"tracking.server.artifacts={tmp_path / 'artifacts'}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"no server on {uri}: {server.stdout.read() if server.poll() is not None else ''}")
        experiment = f"served_{port}"
        proc = lab(tmp_path, *TINY, f"tracking.uri={uri}", f"tracking.experiment={experiment}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert run.info.status == "FINISHED" and M.VAL_BPB in run.data.metrics
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}  # served artifacts
        assert not (tmp_path / "mlruns.db").exists()  # nothing went to a local store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_deepspeed_checkpoint_folders_are_found_and_resumed_like_files(tmp_path):
    from research.training.checkpoints import DEEPSPEED_STATES, find_checkpoint, find_latest

    folder = tmp_path / "run" / "checkpoints" / "preempt.ckpt"  # what DeepSpeed writes: a folder
    (folder / DEEPSPEED_STATES).parent.mkdir(parents=True)
    client_state = {"global_step": 40, "mlflow_run_id": "abc123", "config_hash": "h1", "module": {}}
    torch.save(client_state, folder / DEEPSPEED_STATES)
    assert find_latest(tmp_path / "run", "h1") == folder
    assert find_latest(tmp_path / "run", "another config") is None
    resume = find_checkpoint(str(folder))
    assert resume.path == folder and resume.run_id == "abc123"
    (folder / DEEPSPEED_STATES).write_bytes(b"cut short")
    assert find_latest(tmp_path / "run", "h1") is None  # unreadable: not resumed from


def test_one_lab_train_with_a_slurm_profile_becomes_a_job(tmp_path, shared_cache, slurm):
    proc = lab(tmp_path, *TINY, "cluster=slurm_local", "ablation=single")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "submitted" in proc.stdout
    deadline = time.time() + 180
    done = lambda: any(r.info.status == "FINISHED" for r in grid_runs(tmp_path, "single"))  # noqa: E731
    while time.time() < deadline and not done():
        time.sleep(2)
    (run,) = grid_runs(tmp_path, "single")
    assert run.info.status == "FINISHED" and run.data.tags["slurm.job_id"]
    second = lab(tmp_path, *TINY, "cluster=slurm_local", "ablation=single", "seed=1")
    assert second.returncode == 0, second.stderr[-2000:]
    jobs = [j["job_id"] for p in sorted((tmp_path / "multirun" / "single").glob("*/jobs.json"))
            for j in json.loads(p.read_text())["jobs"]]  # fmt: skip
    assert len(jobs) == 2
    wait(jobs)
    shown = run_lab(tmp_path, "status", "single")  # every run submitted, not only the newest
    assert shown.returncode == 0 and "2 runs submitted one by one" in shown.stdout, shown.stdout
    assert all(job in shown.stdout for job in jobs) and shown.stdout.count("FINISHED") == 2
    several = lab(tmp_path, "-m", "seed=0,1", *TINY, "cluster=slurm_local")
    assert error_line(several) == "error: several runs on Slurm go in a grid: lab grid NAME cluster=PROFILE"


@pytest.mark.parametrize(
    "override, line",
    [
        ("cluster.constraint=h100", "error: sbatch refused the job: Invalid feature specification; "
                                    "change cluster.constraint (now 'h100') in cluster profile"),
        ("cluster.gpus_per_node=1", "error: sbatch refused the job: Invalid generic resource (gres) "
                                    "specification; change cluster.gpus_per_node (now 1)"),
    ],
)  # fmt: skip
def test_a_profile_sbatch_refuses_is_one_line_naming_the_key(tmp_path, shared_cache, slurm, override, line):
    proc = lab(tmp_path, *TINY, "cluster=slurm_local", override)
    assert proc.returncode == 2 and error_line(proc).startswith(line), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
