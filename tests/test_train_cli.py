"""The training platform end to end: config -> data -> Lightning -> MLflow, through the CLI."""

import re

import pytest

from research import metrics as M
from tests.cli_helpers import TINY, error_line, history, lab, runs

ALWAYS = {M.TRAIN_LOSS, M.TRAIN_LM_LOSS, M.VAL_LOSS, M.VAL_BPB, M.TOKENS_PER_S, M.TOKENS_PER_S_PER_GPU,
          M.STEP_MS, M.PEAK_MEM_GIB, M.PEAK_MEM_GIB_JOB, M.KV_CACHE_BYTES_PER_TOKEN, M.FLOPS_PER_TOKEN,
          M.PARAMS, M.ACTIVE_PARAMS}  # fmt: skip
BALANCE_WITH_LOSS = {"aux_loss", "seq_aux", "aux_free+seq_aux", "z_loss", "aux_free+z_loss"}

# One multirun per axis; the other axes sit where most metrics apply (MoE, a balance loss, MTP).
AXES = {
    "attention": ["mha", "gqa", "mla"],
    "ffn": ["dense", "moe"],
    "balance": ["none", "aux_loss", "aux_free", "seq_aux", "aux_free+seq_aux", "aux_free+z_loss"],
    "mtp": ["none", "d1", "d2"],
    "precision": ["fp32", "bf16", "auto"],
    "model": ["tiny", "small"],
}
BASE = {"attention": "mla", "ffn": "moe", "balance": "aux_free+seq_aux", "mtp": "d1"}


def expected_metrics(choice: dict[str, str]) -> set[str]:
    expected = set(ALWAYS)
    if choice["mtp"] != "none":
        expected.add(M.TRAIN_MTP_LOSS)
    if choice["ffn"] == "moe":
        expected |= {M.MAXVIO_BATCH, M.MAXVIO_GLOBAL}
        if choice["balance"] in BALANCE_WITH_LOSS:
            expected.add(M.TRAIN_BALANCE_LOSS)
    return expected  # perf/mfu needs a GPU with a known peak: absent on CPU


@pytest.mark.parametrize("axis", sorted(AXES))
def test_every_choice_of_an_axis_gives_a_finished_run_with_its_metrics(tmp_path, shared_cache, axis):
    choices = AXES[axis]
    fixed = [f"{k}={v}" for k, v in BASE.items() if k != axis]
    tiny = [o for o in TINY if not (axis in ("model", "precision") and o.startswith(f"{axis}="))]
    proc = lab(tmp_path, "-m", f"{axis}={','.join(choices)}", *fixed, *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = runs(tmp_path)
    assert len(recorded) == len(choices)
    for run, value in zip(recorded, choices, strict=True):
        assert run.info.status == "FINISHED"
        assert f"{axis}={value}" in run.data.tags["overrides"]
        choice = {**BASE, axis: value}
        contract = set(run.data.metrics) & set(M.ALL)
        assert contract == expected_metrics(choice), f"{axis}={value}"
        assert run.data.params[f"{axis}.name" if axis in ("attention", "ffn", "balance", "model") else "seed"]
        assert len(run.data.tags["config_hash"]) == 16 and run.data.tags["git_revision"]
    hashes = {r.data.tags["config_hash"] for r in recorded}
    assert len(hashes) == len(choices)


def test_run_records_config_params_and_artifact(tmp_path, shared_cache):
    proc = lab(tmp_path, *TINY, "attention=gqa", "ablation=demo", "trainer.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs(tmp_path, "demo")
    p = run.data.params
    assert p["attention.name"] == "gqa" and p["model.d_model"] == "64" and p["optim.betas"] == "[0.9, 0.95]"
    assert run.data.tags["ablation"] == "demo" and "attention" in run.data.tags["swept_keys"]
    name = run.info.run_name  # not MLflow's random words
    assert name.startswith("demo: model=tiny") and name.endswith(" seed=0") and len(name) <= 250
    assert "finished: val/bpb " in proc.stdout and f"MLflow run {run.info.run_id}" in proc.stdout
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml", "expert_load.json"]
    # Evaluations at the number of steps trained, inside fit (2, 4) and after it (5) alike
    assert [s for s, _ in history(tmp_path, run.info.run_id, M.VAL_BPB)] == [2, 4, 5]
    assert history(tmp_path, run.info.run_id, M.KV_CACHE_BYTES_PER_TOKEN) == [(0, 2 * 2 * 2 * 16 * 4)]
    # once, at step 0: what a compute budget spends, and the MoE's active share of its weights
    ((step, flops),) = history(tmp_path, run.info.run_id, M.FLOPS_PER_TOKEN)
    ((_, params),) = history(tmp_path, run.info.run_id, M.PARAMS)
    ((_, active),) = history(tmp_path, run.info.run_id, M.ACTIVE_PARAMS)
    assert step == 0 and flops > 2 * active and active < params


def test_resume_continues_the_same_run_with_identical_losses(tmp_path, shared_cache):
    full = lab(tmp_path, *TINY, "trainer.max_steps=8", "tracking.run_name=full", "hydra.run.dir=out/full")
    part = lab(tmp_path, *TINY, "trainer.max_steps=4", "optim.total_steps=8", "tracking.run_name=part",
               "hydra.run.dir=out/part")  # fmt: skip
    assert full.returncode == 0 and part.returncode == 0, part.stderr[-3000:]
    # The README's form: the run's own config (model=tiny, ...) comes from its folder, not the defaults.
    resumed = lab(tmp_path, "resume=out/part", "trainer.max_steps=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    by_name = {r.info.run_name: r for r in runs(tmp_path)}
    assert set(by_name) == {"full", "part"}  # the resume wrote into the interrupted run, not a new one
    assert by_name["part"].info.status == "FINISHED"
    a = history(tmp_path, by_name["full"].info.run_id, M.TRAIN_LOSS)
    b = history(tmp_path, by_name["part"].info.run_id, M.TRAIN_LOSS)
    assert [s for s, _ in b] == list(range(8))
    for (step_a, loss_a), (step_b, loss_b) in zip(a, b, strict=True):
        assert step_a == step_b and abs(loss_a - loss_b) <= 1e-6, (step_a, loss_a, loss_b)


def test_divergence_is_stopped_and_recorded_as_failed(tmp_path, shared_cache):
    proc = lab(tmp_path, *TINY, "model.init_std=1e30")
    assert proc.returncode == 1
    assert re.search(r"^run failed: loss is nan at step \d+$", proc.stderr, re.MULTILINE), proc.stderr[-2000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"
    assert re.fullmatch(r"TrainingDiverged: loss is nan at step \d+", run.data.tags["failure_reason"])


def test_bad_input_fails_in_one_line_before_training_and_loses_nothing(tmp_path, shared_cache):
    assert lab(tmp_path, *TINY).returncode == 0
    (before,) = runs(tmp_path)
    checkpoints = sorted(tmp_path.glob("outputs/**/*.ckpt"))

    unknown_choice = lab(tmp_path, *TINY, "attention=flash")
    assert "Could not find 'attention/flash'" in error_line(unknown_choice) and "mla" in error_line(
        unknown_choice
    )
    unknown_key = lab(tmp_path, *TINY, "trainer.max_stpes=3")
    hint = "did you mean trainer.max_steps=3?"
    assert error_line(unknown_key) == f"error: trainer.max_stpes=3: no such key; {hint}"
    bad_spec = lab(tmp_path, *TINY, "attention=gqa", "model.n_kv_heads=3")
    assert (
        error_line(bad_spec)
        == "error: attention.n_kv_heads=3 is not allowed; allowed: a positive divisor of attention.n_heads=4"
    )
    dead_server = lab(tmp_path, *TINY, "tracking.uri=http://127.0.0.1:9")
    assert error_line(dead_server).startswith("error: tracking.uri='http://127.0.0.1:9' is unreachable")
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint at all")
    corrupt = lab(tmp_path, *TINY, "resume=corrupt.ckpt")
    assert error_line(corrupt) == (
        "error: resume='corrupt.ckpt' is not a readable checkpoint: not a checkpoint (corrupt or truncated)"
    )
    missing = lab(tmp_path, *TINY, "resume=nowhere")
    assert "no checkpoint" in error_line(missing)

    for proc in (unknown_choice, unknown_key, bad_spec, dead_server, corrupt, missing):
        assert proc.returncode == 2 and "Epoch" not in proc.stdout
    (after,) = runs(tmp_path)  # no new run, and the old one is as it was
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    assert after.data.metrics == before.data.metrics
    assert sorted(tmp_path.glob("outputs/**/*.ckpt")) == checkpoints


def test_hydra_conventions(tmp_path):
    cfg = lab(tmp_path, "--cfg", "job", "attention=gqa", "model=tiny")
    assert (
        cfg.returncode == 0 and "name: gqa" in cfg.stdout and "n_kv_heads: ${model.n_kv_heads}" in cfg.stdout
    )
    helptext = lab(tmp_path, "--help")
    assert helptext.returncode == 0
    assert "attention: gqa, mha, mla" in helptext.stdout
    balance = "balance: aux_free, aux_free+seq_aux, aux_free+z_loss, aux_loss, none, seq_aux, z_loss"
    assert balance in helptext.stdout
    assert "  name: gqa" in lab(tmp_path, "--help", "attention=gqa").stdout  # the config they compose
    bad = lab(tmp_path, "--help", "attention=foo")
    assert bad.returncode == 2 and bad.stdout == "" and "Could not find 'attention/foo'" in error_line(bad)
    quick = lab(tmp_path, "ablations=quick", "--cfg", "job")
    assert "ablation: quick" in quick.stdout and "baseline: attention=mha ffn=dense" in quick.stdout


def test_help_lists_the_profiles_and_grids_found_and_an_added_key_nothing_reads_is_refused(tmp_path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "mysite.yaml").write_text("defaults: [slurm_h100, _self_]\nname: mysite\n")
    helptext = lab(tmp_path, "--help")
    assert (
        "cluster (a Slurm profile, ./cluster/NAME.yaml): local, mysite, slurm_h100, slurm_local"
        in helptext.stdout
    )
    assert "ablations (a grid, run by lab grid NAME): attention, balance," in helptext.stdout
    # Hydra's own hint for a typo is to add the key with +: it would train, the key read by nothing.
    typo = lab(tmp_path, *TINY, "+atention=mla")
    assert typo.returncode == 2
    assert (
        error_line(typo) == "error: +atention=mla adds a key that nothing reads; did you mean attention=mla?"
    )
    nested = lab(tmp_path, *TINY, "+trainer.max_step=3")
    assert error_line(nested).endswith("did you mean trainer.max_steps=3?")
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "outputs").exists()


def test_text_and_hf_data_train(tmp_path):
    import json

    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(40):
        (folder / f"note{i}.md").write_text(f"# Note {i}\n" + "Some plain text to learn from. " * 40)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": f"row {i} " + "words " * 200}) for i in range(80))
    )

    bpe = ["data.tokenizer=bpe", "data.bpe_vocab_size=320"]
    text = lab(
        tmp_path, *TINY, "data=text", f"data.path={folder}", *bpe, "data.val_fraction=0.2", "ablation=text"
    )
    assert text.returncode == 0, text.stderr[-3000:]
    hf = lab(tmp_path, *TINY, "data=hf", f"data.name={ds}", "data.val_fraction=0.2", "ablation=hf")
    assert hf.returncode == 0, hf.stderr[-3000:]
    for experiment in ("text", "hf"):
        (run,) = runs(tmp_path, experiment)
        assert run.info.status == "FINISHED" and 0 < run.data.metrics[M.VAL_BPB] < 20
    (text_run,) = runs(tmp_path, "text")
    assert text_run.data.params["data.tokenizer"] == "bpe"

    missing = lab(tmp_path, *TINY, "data=text", f"data.path={tmp_path / 'nowhere'}")
    assert missing.returncode == 2
    assert error_line(missing) == f"error: data.path='{tmp_path / 'nowhere'}' does not exist"


def test_hydra_flags_are_split_from_overrides():
    from research.cli import split_flags

    flags, overrides = split_flags(["-m", "a=1", "--cfg", "job", "b=2", "--info", "defaults", "c=3"])
    assert flags == ["-m", "--cfg", "job", "--info", "defaults"] and overrides == ["a=1", "b=2", "c=3"]


class _Payload:
    """Unpickled, it would create the file named: what a planted checkpoint could run instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, shared_cache):
    import torch

    marker = tmp_path / "payload-ran"
    planted = tmp_path / "planted.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "x": _Payload(str(marker))}, planted)
    proc = lab(tmp_path, *TINY, f"resume={planted}")
    assert error_line(proc) == (
        f"error: resume='{planted}' is not a readable checkpoint: it holds objects that could run code "
        f"(io.open): refused, not run"
    )
    assert proc.returncode == 2 and not marker.exists()
    assert runs(tmp_path) == []  # refused before any run was recorded


def test_passwords_in_urls_are_never_recorded(tmp_path, shared_cache):
    from mlflow import MlflowClient

    secret = "tracking.server.backend=postgresql://lab:s3cret@db:5432/mlflow"
    proc = lab(tmp_path, *TINY, secret, "hydra.run.dir=out/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.data.params["tracking.server.backend"] == "postgresql://lab:***@db:5432/mlflow"
    assert "s3cret" not in run.data.tags["overrides"] + run.data.tags["arm"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    recorded = (
        tmp_path / client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    ).read_text()
    assert "s3cret" not in recorded and "lab:***@db" in recorded
    assert "s3cret" not in (tmp_path / "out" / "run" / "config.yaml").read_text()


def test_redact_masks_only_the_password():
    from research.runtime import redact

    assert (
        redact("postgresql+psycopg2://lab:lab@127.0.0.1:5432/mlflow")
        == "postgresql+psycopg2://lab:***@127.0.0.1:5432/mlflow"
    )
    assert (
        redact("http://h:5000 sqlite:///mlruns.db https://u@h")
        == "http://h:5000 sqlite:///mlruns.db https://u@h"
    )


def test_a_resume_that_would_change_the_run_is_refused_before_the_run_is_reopened(tmp_path, shared_cache):
    assert lab(tmp_path, *TINY, "hydra.run.dir=out/run").returncode == 0
    (before,) = runs(tmp_path)
    proc = lab(tmp_path, "resume=out/run", "model.n_layers=3")
    assert error_line(proc) == (
        "error: resume='out/run': model.n_layers=3 would change what the run computes (it has 2); "
        "a resume may change only trainer.max_steps"
    )
    assert "would change what the run computes" in error_line(
        lab(tmp_path, "resume=out/run", "attention=gqa")
    )
    config = tmp_path / "out" / "run" / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 5"))  # not what the checkpoint trained
    assert "was written by another config than" in error_line(
        lab(tmp_path, "resume=out/run/checkpoints/last.ckpt")
    )
    (after,) = runs(tmp_path)
    assert after.info.status == before.info.status == "FINISHED" and "failure_reason" not in after.data.tags


def test_the_server_puts_mlflows_login_app_in_front_only_when_asked():
    from research.config.compose import compose_run
    from research.tracking.server import server_command

    plain = server_command(compose_run([]).tracking.server)
    assert "--app-name" not in plain and plain[plain.index("--host") + 1] == "127.0.0.1"
    guarded = server_command(compose_run(["tracking.server.app_name=basic-auth"]).tracking.server)
    assert guarded[guarded.index("--app-name") + 1] == "basic-auth"


def test_runs_started_at_once_into_a_store_that_does_not_exist_yet_all_record(tmp_path, shared_cache):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "LAB_CACHE_DIR": str(shared_cache)}
    args = [sys.executable, "-m", "research.cli", "train", *TINY, "trainer.max_steps=2"]
    pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen([*args, f"seed={i}", f"hydra.run.dir=out/{i}"], cwd=tmp_path, env=env, **pipes)
             for i in range(4)]  # fmt: skip
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-500:] for e in errors]
    assert sorted(r.data.params["seed"] for r in runs(tmp_path)) == ["0", "1", "2", "3"]
