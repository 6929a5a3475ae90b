"""Compute-matched arms and size ladders: what each job of a grid is told to train."""

import pytest
import torch

from research.config.build import model_config
from research.config.compose import compose_run
from research.experiments import budget
from research.experiments.grid import compose_grid, expand, sizes, with_budget
from research.model.transformer import Transformer
from research.training.data import tokenize_corpus
from tests.test_grid import write_grid

TINY_ARMS = "arms: {plain: [attention=mha, ffn=dense, balance=none], mla_mtp: [attention=mla, mtp=d1]}\n"


def meta_flops_per_token(cfg) -> float:
    """Training FLOPs per token as ``research.model.stats`` counts them (on the meta device)."""
    with torch.device("meta"):
        model = Transformer(model_config(cfg, tokenize_corpus(cfg.data, log=lambda _: None).vocab_size))
    return model.flops_per_token(cfg.data.seq_len)


def grid_jobs(tmp_path, monkeypatch, grid: str, overrides=()):
    monkeypatch.chdir(tmp_path)
    write_grid(tmp_path, "g", grid)
    cfg = compose_grid("g", list(overrides))
    jobs = expand("g", cfg, list(overrides))
    with_budget(cfg, jobs, tmp_path / "multirun" / "g")
    return jobs


def steps_of(job) -> int:
    return int([o for o in job.overrides if o.startswith("trainer.max_steps=")][-1].split("=")[1])


def test_a_flops_budget_gives_each_arm_the_steps_its_own_flops_per_token_afford(
    tmp_path, monkeypatch, shared_cache
):
    jobs = grid_jobs(tmp_path, monkeypatch, TINY_ARMS + "seeds: [0, 1]\nbudget: {flops: 2e12}\n")
    assert len(jobs) == 4
    by_arm = {}
    for job in jobs:
        cfg = compose_run(job.overrides)
        per_token = meta_flops_per_token(cfg)
        per_step = budget.tokens_per_step(cfg)
        assert cfg.trainer.max_steps == steps_of(job) == round(2e12 / (per_token * per_step))
        assert cfg.optim.total_steps == cfg.trainer.max_steps  # the schedule follows the steps
        by_arm.setdefault(job.arm, set()).add((steps_of(job), per_token))
    assert all(len(v) == 1 for v in by_arm.values())  # the seeds of an arm share their steps
    (plain_steps, plain_flops), (mtp_steps, mtp_flops) = by_arm["plain"].pop(), by_arm["mla_mtp"].pop()
    assert mtp_flops > plain_flops and mtp_steps < plain_steps  # MTP's block and MLA cost steps
    assert plain_steps * plain_flops == pytest.approx(mtp_steps * mtp_flops, rel=0.01)


def test_a_tokens_budget_gives_every_arm_of_one_batch_the_same_steps(tmp_path, monkeypatch, shared_cache):
    # data.batch_size=2, seq_len=32 (the tiny grid): 64 tokens a step
    jobs = grid_jobs(tmp_path, monkeypatch, TINY_ARMS + "seeds: [0]\nbudget: {tokens: 640}\n")
    assert [steps_of(j) for j in jobs] == [10, 10]


def test_a_gpu_seconds_budget_times_each_arm_once_and_keeps_the_probe(tmp_path, monkeypatch, shared_cache):
    probed = []

    def fake_probe(cfg, steps):
        probed.append((cfg.attention.name, steps))
        return 6400.0 if cfg.attention.name == "mha" else 3200.0  # tokens/s

    monkeypatch.setattr("research.experiments.grid.tokens_per_s", fake_probe)
    grid = TINY_ARMS + "seeds: [0, 1]\nbudget: {gpu_seconds: 1, probe_steps: 3}\n"
    jobs = grid_jobs(tmp_path, monkeypatch, grid)
    assert {(j.arm, steps_of(j)) for j in jobs} == {("plain", 100), ("mla_mtp", 50)}  # 64 tokens a step
    assert probed == [("mha", 3), ("mla", 3)]
    grid_jobs(tmp_path, monkeypatch, grid)  # a relaunch: the same steps, from the kept probes
    assert len(probed) == 2 and (tmp_path / "multirun" / "g" / "probes.json").exists()


def test_the_probe_measures_tokens_per_second_of_a_real_run(shared_cache):
    from research.training.probe import tokens_per_s

    tiny = [
        "model=tiny",
        "precision=fp32",
        "data.seq_len=32",
        "data.batch_size=2",
        "trainer.perf_warmup_steps=1",
    ]
    assert tokens_per_s(compose_run(tiny), 2) > 0


@pytest.mark.parametrize(("spec", "message"), [
    ("budget: {flops: -1}", "grid.budget.flops=-1 is not allowed; allowed: a number above 0"),
    ("budget: {flop: 1e12}", "grid.budget={'flop': 1000000000000.0} is not allowed; allowed: one of"),
    ("budget: {tokens: 1e6, flops: 1e12}", "grid.budget="),
    ("budget: {tokens: 1e6, probe_steps: 3}", "grid.budget.probe_steps=3 is not allowed; allowed: only"),
    ("sizes: [tiny, huge]", "grid.sizes='huge' is not allowed; allowed: a list of presets (base, small, t"),
    ("sizes: [tiny, tiny]", "grid.sizes='tiny' is not allowed; allowed: each size once"),
])  # fmt: skip
def test_a_bad_budget_or_ladder_names_the_key_and_what_is_allowed(tmp_path, monkeypatch, spec, message):
    with pytest.raises(ValueError) as e:
        grid_jobs(tmp_path, monkeypatch, TINY_ARMS + spec + "\n")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_budget_refuses_a_steps_override_it_would_silently_replace(tmp_path, monkeypatch):
    with pytest.raises(
        ValueError, match=r"trainer.max_steps='50' is not allowed; allowed: no value while grid.budget"
    ):
        grid_jobs(tmp_path, monkeypatch, TINY_ARMS + "budget: {tokens: 640}\n", ["trainer.max_steps=50"])


def test_a_ladder_runs_every_arm_at_every_size_and_seed(tmp_path, monkeypatch):
    grid = TINY_ARMS + "seeds: [0, 1]\nsizes: [tiny, {preset: tiny, d_model: 96, name: wide}]\n"
    jobs = grid_jobs(tmp_path, monkeypatch, grid)
    assert len(jobs) == 2 * 2 * 2
    assert {(j.size, j.arm, j.seed) for j in jobs} == {
        (s, a, seed) for s in ("tiny", "wide") for a in ("plain", "mla_mtp") for seed in (0, 1)
    }
    wide = compose_run(next(j for j in jobs if j.size == "wide").overrides)
    assert wide.model.d_model == 96 and wide.grid.size == "wide"
    assert sizes(compose_grid("g", [])) == {
        "tiny": ["model=tiny"],
        "wide": ["model=tiny", "model.d_model=96"],
    }
