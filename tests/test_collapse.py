"""Routing collapse is detected, reported in one line, tagged on the run, and marked by compare;
and the quality gate's rule fails a fast path that collapses or learns less."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from mlflow import MlflowClient

import research.training.run as train_mod
from bench import quality
from research import metrics as M
from research.config.compose import compose_run
from research.experiments.compare import RunRecord, load_runs, summarise
from research.tracking import tags as T
from tests.cli_helpers import TINY


def _train_moe(tmp_path, monkeypatch, caplog, forced: int):
    """A tiny MoE run (8 experts, top-2) whose routers always pick experts 0..forced-1."""
    build = train_mod.build

    def build_then_force(cfg):
        data, module = build(cfg)
        for m in module.model.moe_layers():
            m.router.bias[:forced] = 100.0  # sigmoid affinities are below 1: these always win
        return data, module

    monkeypatch.setattr(train_mod, "build", build_then_force)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = compose_run([*TINY, "ffn=moe", "balance=none", "trainer.max_steps=6", f"tracking.uri={uri}"])
    with caplog.at_level(logging.WARNING, logger="research.training.callbacks"):
        result = train_mod.train(cfg, tmp_path / "run")
    return uri, MlflowClient(uri).get_run(result.run_id).data.tags


def test_a_collapsed_router_is_warned_about_tagged_and_marked_by_compare(tmp_path, shared_cache,
                                                                        monkeypatch, caplog):  # fmt: skip
    uri, tags = _train_moe(tmp_path, monkeypatch, caplog, forced=2)
    assert tags.get(T.MOE_COLLAPSED) == "true"
    warnings = [r.getMessage() for r in caplog.records if "routing collapsed" in r.getMessage()]
    assert warnings and "\n" not in warnings[0]
    assert "blocks.1.ffn" in warnings[0] and "E/K-1=3" in warnings[0]  # tiny: 8 experts, top-2
    assert "same 2 experts" in warnings[0]
    runs = load_runs(uri, ["adhoc"])
    assert [r.collapsed for r in runs] == [True]
    assert summarise(runs, (M.VAL_BPB,), None)[0].collapsed == [0]


@pytest.mark.parametrize("forced", [0, 1], ids=["healthy", "one-expert-always-on"])
def test_a_router_that_still_chooses_is_not_called_collapsed(tmp_path, shared_cache, monkeypatch, caplog,
                                                            forced):  # fmt: skip
    # forced=1: expert 0 takes every token (MaxVio at its ceiling), the second slot still routes.
    _, tags = _train_moe(tmp_path, monkeypatch, caplog, forced=forced)
    assert T.MOE_COLLAPSED not in tags
    assert "routing collapsed" not in caplog.text


def _runs(arm: str, bpb: list[float], maxvio: list[float], collapsed: bool | list[int] = False,
          status="FINISHED"):  # fmt: skip
    return [
        RunRecord(
            f"{arm}{s}",
            "gate",
            arm,
            s,
            status,
            "",
            {M.VAL_BPB: b, M.MAXVIO_GLOBAL: v, M.TOKENS_PER_S: 1e5},
            None,
            collapsed if isinstance(collapsed, bool) else s in collapsed,
        )
        for s, (b, v) in enumerate(zip(bpb, maxvio, strict=True))
    ]


PLAIN = _runs("a speed=plain", [1.52, 1.55, 1.58], [0.30, 0.40, 0.35])


@pytest.mark.parametrize(("fast", "ok"), [
    (_runs("a speed=auto", [1.53, 1.56, 1.54], [0.28, 0.45, 0.33]), True),  # within the seeds' spread
    (_runs("a speed=auto", [1.51, 1.50, 1.49], [0.30, 0.36, 0.33]), True),  # better is never a failure
    (_runs("a speed=auto", [4.61, 4.60, 4.62], [7.0, 7.0, 6.97], collapsed=True), False),  # the collapse
    (_runs("a speed=auto", [1.53, 1.56, 1.54], [0.28, 0.45, 0.33], collapsed=[1]), False),  # one seed
    (_runs("a speed=auto", [1.60, 1.62, 1.66], [0.31, 0.36, 0.33]), False),  # worse beyond the spread
    (_runs("a speed=auto", [1.56, 1.585, 1.615], [0.31, 0.36, 0.33]), False),  # worse, seed by seed
    (_runs("a speed=auto", [1.53, 1.56, 1.54], [1.90, 2.10, 2.00]), False),  # balance lost
    (_runs("a speed=auto", [1.53, 1.56, 1.54], [0.3, 0.4, 0.3], status="FAILED"), False),
    ([], False),  # an arm that never ran
    # a MoE arm at 200 steps, as measured: the paths differ by +-0.1 bpb seed by seed, for no reason
    (_runs("a speed=auto", [1.636, 1.473, 1.713], [0.31, 0.36, 0.33]), True),
    (_runs("a speed=auto", [1.55, 1.65, 1.66], [0.31, 0.36, 0.33]), False),  # large gap, p < 0.05
    (_runs("a speed=auto", [4.52, 1.55, 1.68], [0.31, 0.36, 0.33]), False),  # a gap no spread explains
])  # fmt: skip
def test_the_gate_fails_a_fast_path_that_learns_less_or_routes_differently(fast, ok):
    (verdict,) = quality.judge([*PLAIN, *fast])
    assert verdict.arm == "a"
    assert verdict.ok is ok, verdict.problems
    assert bool(verdict.problems) is not ok


def test_the_gate_states_the_gap_it_could_have_seen():
    """A pass rules out only gaps the seeds' spread lets the strict test see: the table says which."""
    from scipy import stats

    fast = [1.636, 1.473, 1.713]
    plain = [r.metrics[M.VAL_BPB] for r in PLAIN]
    diffs = np.subtract(fast, plain)
    se = np.std(diffs, ddof=1) / np.sqrt(3)
    got = quality.judge_bpb(fast, plain, paired=True)
    assert got.detectable == pytest.approx(stats.t.ppf(1 - quality.P_VALUE, 2) * se)
    assert got.ok and got.detectable > got.delta  # what passed here was too small to be seen
    # at the detectable gap itself, the strict test's p is the threshold
    shifted = list(np.add(plain, diffs - diffs.mean() + got.detectable))
    assert quality.t_test_p(shifted, plain, "greater", True) == pytest.approx(quality.P_VALUE)


def test_the_gate_counts_collapsed_seeds_against_the_plain_paths():
    plain = _runs("a speed=plain", [1.52, 1.55, 1.58], [0.30, 0.40, 0.35], collapsed=[2])
    as_often = _runs("a speed=auto", [1.53, 1.56, 1.54], [0.28, 0.45, 0.33], collapsed=[0])
    more_often = _runs("a speed=auto", [1.53, 1.56, 1.54], [0.28, 0.45, 0.33], collapsed=[0, 1])
    assert quality.judge([*plain, *as_often])[0].ok
    (verdict,) = quality.judge([*plain, *more_often])
    assert not verdict.ok and "seeds [0, 1]" in verdict.problems[0], verdict.problems


def test_gradient_parity_passes_a_sound_compiled_path_and_fails_a_broken_one(shared_cache, monkeypatch):
    """The gate's seconds-long check: compiled blocks' gradients against eager on a real batch."""
    tiny = ["model=tiny", "data.seq_len=32", "data.batch_size=4"]
    (error,) = quality.gradient_parity(tiny, repeats=1)
    assert error < quality.PARITY_MAX

    def broken_backward(model, **options):  # a compiled path whose backward scales one gradient
        model.blocks[0].attn_norm.weight.register_hook(lambda g: g * 1e3)

    monkeypatch.setattr("research.training.converters.compile_blocks", broken_backward)
    (error,) = quality.gradient_parity(tiny, repeats=1)
    assert error > quality.PARITY_MAX
