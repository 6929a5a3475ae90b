"""Decoding: the static-cache engine against the full forward, sampling, and MTP speculation
against plain greedy decoding and against drafts recomputed from scratch."""

import math

import pytest
import torch

from research.errors import DecodeError
from research.inference.engine import Decoder, Sampling, generate, sample
from research.inference.speculative import speculative_generate
from research.model.transformer import Transformer
from tests.conftest import ATTENTION_SPECS, tiny_config

LENGTHS = (5, 9, 2)  # prompts of different lengths in one batch


def prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], max_new: int) -> list[int]:
    """Greedy tokens by a full forward over the whole sequence at every step: no cache at all."""
    seq = list(prompt)
    for _ in range(max_new):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("kind", sorted(ATTENTION_SPECS))
def test_cached_decoding_of_a_ragged_batch_equals_each_rows_full_forward(kind):
    """Prefill right-padded prompts of three lengths, then decode 6 tokens per row: every row's
    logits equal one full forward of that row's own sequence, to 1e-5 in fp32."""
    model = Transformer(tiny_config(kind, "moe", n_layers=3)).eval()
    ps, new = prompts(64), torch.randint(0, 64, (len(LENGTHS), 6))
    decoder = Decoder(model, len(ps), max(LENGTHS) + 6)
    got = [decoder.prefill(ps)]
    got += [decoder.step(new[:, t]) for t in range(5)]
    got = torch.stack(got, dim=1)  # [B, 6, V]: logits after the prompt, then after each new token
    with torch.no_grad():
        for row, p in enumerate(ps):
            full = model(torch.tensor([p + new[row, :5].tolist()])).logits[0, len(p) - 1 :]
            torch.testing.assert_close(got[row], full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(ATTENTION_SPECS))
def test_the_cache_holds_what_the_model_says_it_caches(kind):
    model = Transformer(tiny_config(kind, n_layers=2)).eval()
    decoder = Decoder(model, batch=3, max_len=40)
    assert decoder.cache_bytes() == 3 * 40 * model.kv_cache_bytes_per_token(bytes_per_value=4)  # fp32


@pytest.mark.parametrize("kind", sorted(ATTENTION_SPECS))
def test_greedy_generation_equals_the_uncached_reference(kind):
    model = Transformer(tiny_config(kind, "moe")).eval()
    ps = prompts(64)
    out = generate(model, ps, max_new=8)
    assert out == [greedy_reference(model, p, 8) for p in ps]


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, Sampling(temperature=1.0, top_p=0.7), g)
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 reach 0.7: the rest is never drawn
    assert counts[0] == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised over the nucleus
    full = torch.bincount(sample(logits, Sampling(temperature=1.0), g), minlength=4).float() / 4000
    torch.testing.assert_close(full, torch.tensor([0.5, 0.3, 0.15, 0.05]), rtol=0, atol=0.03)
    assert (sample(logits, Sampling(temperature=1.0, top_p=0.1), g) == 0).all()  # the top token stays


def test_sampling_is_reproducible_by_seed_and_greedy_at_temperature_zero():
    model = Transformer(tiny_config("mla")).eval()
    ps = prompts(64)
    a = generate(model, ps, 10, Sampling(temperature=1.0, seed=3))
    assert a == generate(model, ps, 10, Sampling(temperature=1.0, seed=3))
    assert a != generate(model, ps, 10, Sampling(temperature=1.0, seed=4))
    assert generate(model, ps, 10, Sampling(temperature=0.0)) == generate(model, ps, 10)


@pytest.mark.parametrize(("kind", "depth"), [("mha", 1), ("gqa", 2), ("mla", 1), ("mla", 2), ("mla", 3)])
def test_speculative_greedy_equals_plain_greedy(kind, depth):
    """A 5-token vocabulary makes drafts often right and often wrong, so both branches run."""
    model = Transformer(tiny_config(kind, "moe", mtp_depth=depth, vocab_size=5)).eval()
    ps = prompts(5)
    spec = speculative_generate(model, ps, max_new=24)
    assert spec.tokens == generate(model, ps, max_new=24)
    assert 0 < spec.acceptance[0] < 1
    deeper = zip(spec.acceptance, spec.acceptance[1:], strict=False)
    assert all(a >= b for a, b in deeper)  # draft k is kept only where draft k-1 is


@torch.no_grad()
def drafts_from_scratch(model: Transformer, seq: list[int]) -> list[int]:
    """The D drafts after ``seq`` (final tokens t_0..t_n) by full forwards, no cache: the trunk
    over t_0..t_{n-1}, then depth k over every position with tokens shifted by k."""
    idx = torch.tensor([seq])
    n = len(seq) - 1
    h = model.trunk(idx[:, :n], torch.arange(n))
    tokens, drafts = idx[0].tolist(), []
    for k, module in enumerate(model.mtp, start=1):
        h = module(h, model.embed(torch.tensor([tokens[k : k + n]])), torch.arange(n))
        drafts.append(int(model.head(module.out_norm(h[0, -1])).argmax()))
        tokens.append(drafts[-1])
    return drafts


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_acceptance_counts_the_drafts_a_cacheless_drafter_makes(depth):
    """Replays each row's rounds with drafts recomputed from scratch: the windowed caches of the
    MTP depths must draft exactly the same tokens, so the acceptance and the rounds agree."""
    model = Transformer(tiny_config("mla", "moe", mtp_depth=depth, vocab_size=5)).eval()
    ps, max_new = prompts(5), 20
    plain = generate(model, ps, max_new)
    kept, rounds = [0] * depth, 0
    for p, out in zip(ps, plain, strict=True):
        seq, n = p + out, len(p)  # token n (the first new one) comes from the prefill
        while n - len(p) < max_new - 1:
            drafts = drafts_from_scratch(model, seq[: n + 1])
            a = 0
            while a < depth and n + 1 + a < len(seq) and drafts[a] == seq[n + 1 + a]:
                a += 1
            kept = [c + (a > k) for k, c in enumerate(kept)]
            rounds, n = rounds + 1, n + a + 1
    spec = speculative_generate(model, ps, max_new)
    assert spec.rounds == rounds
    assert spec.acceptance == pytest.approx([c / rounds for c in kept])


def test_speculation_needs_mtp_and_prompts_within_the_context():
    model = Transformer(tiny_config("mla")).eval()
    with pytest.raises(DecodeError, match=r"mtp\.depth=0"):
        speculative_generate(model, prompts(64), 4)
    with pytest.raises(DecodeError, match="longer than the model's context"):
        generate(model, prompts(64, lengths=(3, 40)), 4, context=32)
    with pytest.raises(DecodeError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_the_decode_bench_runs_and_checks_its_targets_on_a_cpu():
    """``bench.decode`` on a tiny shape: a row per side, the cache as computed, the targets named."""
    import subprocess
    import sys

    args = ["--tiny", "--device", "cpu", "--contexts", "32,64", "--batches", "1", "--new-tokens", "2",
            "--sides", "ours eager,peer eager", "--budget-gib", "0.05"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "bench.decode", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| mha |", "| gqa |", "| mla |"))]
    assert len(rows) == 3 * 2 * 2 + 3  # variants x contexts x sides, then the largest-batch rows
    assert all(r.endswith("| 1.000 |") for r in rows if "| ours eager |" in r)  # cache as computed
    assert "- MLA's measured cache within 10% of computed: worst 0.0%: met" in proc.stdout
    assert "- at ctx 64, MLA fits" in proc.stdout

    # Each attention x side runs in its own process: one past its time is its rows, as NaN.
    cmd = [sys.executable, "-m", "bench.decode", *args, "--variants", "mla", "--side-timeout", "0.01"]
    late = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert late.returncode == 0, late.stderr[-3000:]
    assert "mla peer eager: not done within 0.01 s" in late.stdout
    assert "| mla | peer eager | 1 | 64 | nan | nan | - | - |" in late.stdout


def test_largest_batch_is_the_cpus_arithmetic_and_few_tries_where_memory_is_measured():
    from research.inference.measure import GIB, largest_batch, peak_bytes

    model = Transformer(tiny_config("mla", "dense"))
    per_row = 64 * model.kv_cache_bytes_per_token(4)  # fp32 on a CPU, 64 positions a row
    weights = peak_bytes(model, 0, 64)
    assert largest_batch(model, 64, (weights + 100 * per_row + per_row / 2) / GIB) == 100
    assert largest_batch(model, 64, (weights + per_row / 2) / GIB) == 0

    # A GPU's measured peaks: a fixed part, a per-row part, 2 MiB allocator blocks, and out of
    # memory past 700 rows whatever the budget. Each try is an allocation: few, and the answer fits.
    tries = []

    def measured(_model, batch, _context):
        tries.append(batch)
        if batch > 700:
            return float("inf")
        return math.ceil((3 * GIB + batch * 40e6) / 2**21) * 2**21

    for budget in (20, 100):
        truth = max(b for b in range(1, 2000) if measured(model, b, 64) <= budget * GIB)
        tries.clear()
        got = largest_batch(model, 64, budget, peak=measured)
        assert len(tries) <= (4 if budget == 20 else 16), tries  # the line held / it had to bisect
        assert measured(model, got, 64) <= budget * GIB and got >= 0.97 * truth, (budget, got, truth)
