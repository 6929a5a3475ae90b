"""``lab generate`` and ``lab decode-bench`` on tiny trained runs, and ``eval.decode``'s metrics."""

from pathlib import Path

import pytest

from research import metrics as M
from tests.cli_helpers import TINY, error_line, lab, run_lab, runs

DECODE = ["eval.decode=true", "eval.decode_batches=[1,2]", "eval.decode_contexts=[16,32]",
          "eval.decode_new_tokens=8", "eval.decode_memory_gib=0.01"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache):
    """Two tiny runs, without MTP and with one depth, measured by ``eval.decode`` after training."""
    cwd = tmp_path_factory.mktemp("generate")
    proc = lab(cwd, "-m", "mtp=none,d1", "attention=mla", "ffn=moe", *TINY, "trainer.max_steps=30",
               "trainer.val_every=30", "trainer.checkpoint_every=30", *DECODE)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, mtp = runs(cwd)
    return cwd, plain, mtp


def folder(run) -> str:
    return run.data.tags["run_dir"]


def test_eval_decode_logs_the_decoding_metrics_of_every_setting(trained):
    _, plain, mtp = trained
    for run in (plain, mtp):
        m = run.data.metrics
        for batch in (1, 2):
            for context in (16, 32):
                assert m[M.per_setting(M.DECODE_TOKENS_PER_S, batch, context)] > 0
        assert m[M.DECODE_TOKENS_PER_S] == m[M.per_setting(M.DECODE_TOKENS_PER_S, 1, 16)]
        # The cache as allocated: fp32 on a CPU, (context + 3 warm-up + 8 new) positions per row
        computed = 2 * (32 + 3 + 8) * m[M.KV_CACHE_BYTES_PER_TOKEN] / 2**30
        assert m[M.per_setting(M.DECODE_KV_CACHE_GIB, 2, 32)] == pytest.approx(computed)
        # On a CPU the largest batch is counted: the weights, then whole rows of cache in the budget
        for context in (16, 32):
            rows = (0.01 * 2**30 - 4 * m[M.PARAMS]) // (context * m[M.KV_CACHE_BYTES_PER_TOKEN])
            assert m[M.per_setting(M.DECODE_MAX_BATCH, None, context)] == rows > 1
        assert m[M.DECODE_MAX_BATCH] == m[M.per_setting(M.DECODE_MAX_BATCH, None, 32)]  # the longest context
    assert M.MTP_ACCEPTANCE not in plain.data.metrics
    assert 0 <= mtp.data.metrics[M.MTP_ACCEPTANCE] <= 1 and mtp.data.metrics[M.SPECULATIVE_SPEEDUP] > 0


def test_generate_prints_the_prompt_and_its_continuation(trained):
    cwd, plain, _ = trained
    proc = run_lab(cwd, "generate", folder(plain), "def ", "class ", "--max-new", "24", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.split("\n\n")[:2]
    assert first.startswith("def ") and len(first) > len("def ")
    assert second.startswith("class ") and len(second) > len("class ")
    again = run_lab(cwd, "generate", folder(plain), "def ", "class ", "--max-new", "24", "--seed", "1")
    assert again.stdout == proc.stdout  # sampled, but by seed


def test_speculative_generation_by_run_id_is_the_greedy_text(trained):
    cwd, _, mtp = trained
    greedy = run_lab(cwd, "generate", folder(mtp), "import ", "--max-new", "30", "--temperature", "0")
    spec = run_lab(cwd, "generate", mtp.info.run_id, "import ", "--max-new", "30", "--speculative")
    assert greedy.returncode == 0 and spec.returncode == 0, spec.stderr[-3000:]
    assert spec.stdout == greedy.stdout
    assert "drafts kept: depth 1 " in spec.stderr


def test_bad_requests_get_one_line(trained):
    cwd, plain, mtp = trained
    missing = run_lab(cwd, "generate", str(cwd / "nowhere"), "x")
    assert missing.returncode == 2 and "no checkpoint at" in error_line(missing)
    long = run_lab(cwd, "generate", folder(plain), "x" * 100, "--max-new", "4")
    assert "a prompt of 100 tokens is longer than the model's context (32 tokens" in error_line(long)
    no_mtp = run_lab(cwd, "generate", folder(plain), "x", "--speculative")
    assert "this model has mtp.depth=0" in error_line(no_mtp)
    hot = run_lab(cwd, "generate", folder(mtp), "x", "--speculative", "--temperature", "0.7")
    assert "--speculative decodes greedily" in error_line(hot)
    bad = run_lab(cwd, "decode-bench", folder(plain), "--batches", "1,x")
    assert "--batches '1,x': expected positive integers" in error_line(bad)
    unknown = run_lab(cwd, "generate", "0" * 32, "x")
    assert f"'{'0' * 32}': no such MLflow run" in error_line(unknown)


def test_decode_bench_prints_and_logs_to_the_run(trained):
    cwd, _, mtp = trained
    proc = run_lab(cwd, "decode-bench", folder(mtp), "--batches", "1,3", "--contexts", "24",
                   "--new-tokens", "4",
                   "--memory-gib", "0.01", "--log")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "decode/tokens_per_s/b3_ctx24" in proc.stdout
        and f"logged to MLflow run {mtp.info.run_id}" in proc.stdout
    )
    (after,) = [r for r in runs(cwd) if r.info.run_id == mtp.info.run_id]
    assert after.data.metrics["decode/tokens_per_s/b3_ctx24"] > 0
    assert Path(folder(mtp), "checkpoints", "last.ckpt").exists()
