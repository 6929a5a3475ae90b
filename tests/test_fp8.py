"""DeepSeek-V3's FP8 recipe, checked on a CPU through the emulation path (same quantisation, fp32
GEMMs): round-trip bounds, the linear's three GEMMs against fp32, and why the tiles are small."""

import pytest
import torch

from components.fp8 import FP8Linear
from components.fp8.format import (
    E4M3_MAX,
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_tiles,
)
from tests.cli_helpers import TINY, error_line, lab, runs
from tests.conftest import assert_ok_under_triton_interpreter

# E4M3 keeps 3 mantissa bits: a normal value is off by at most half a step, 2^-4 of itself; below
# the smallest normal (2^-6 x scale) the step is fixed, 2^-9 x scale, so half of it bounds the error.
REL, SUBNORMAL_ABS = 2.0**-4, 2.0**-10


def within_e4m3(x, deq, scale_per_element):
    bound = torch.maximum(x.abs() * REL, scale_per_element * SUBNORMAL_ABS)
    return bool(((x - deq).abs() <= bound * (1 + 1e-6)).all())


@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_error_is_within_e4m3s_bound_in_every_tile_and_block(pow2):
    x = torch.randn(64, 512) * torch.logspace(-3, 3, 512)  # tiles of very different ranges
    q, s = quantize_tiles(x, pow2)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 4)
    assert within_e4m3(x, dequantize_tiles(q, s), s.repeat_interleave(128, dim=1))
    assert (q.float().abs().amax(-1) <= E4M3_MAX).all()
    w = torch.randn(256, 384) * 0.02
    qw, sw = quantize_blocks(w, pow2)
    assert sw.shape == (2, 3)
    assert within_e4m3(w, dequantize_blocks(qw, sw), sw.repeat_interleave(128, 0).repeat_interleave(128, 1))
    exact = x.reshape(64, 4, 128).abs().amax(-1) / E4M3_MAX
    if pow2:  # the next power of two up: exact, and less than twice the plain scale
        assert torch.equal(torch.log2(s), torch.log2(s).round())
        assert (s >= exact).all() and (s < 2 * exact).all()
    else:
        assert torch.equal(s, exact)
    zeros, scale = quantize_tiles(torch.zeros(2, 128))
    assert torch.equal(dequantize_tiles(zeros, scale), torch.zeros(2, 128))


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize(("dgrad", "wgrad"), [("fp8", "fp8"), ("bf16", "fp8"), ("fp8", "bf16")])
def test_fp8_linear_forward_and_both_gradients_match_fp32(dgrad, wgrad):
    torch.manual_seed(0)
    M, K, N = 200, 300, 288  # none a multiple of 128: padded inside
    layer = FP8Linear(K, N, path="emulated", dgrad=dgrad, wgrad=wgrad)
    ref = torch.nn.Linear(K, N, bias=False)
    ref.weight.data.copy_(layer.weight.data)
    x = torch.randn(4, M // 4, K)
    x8, x32 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y8, y32 = layer(x8), ref(x32)
    grad = torch.randn_like(y32)
    y8.backward(grad)
    y32.backward(grad)
    # Tolerance: E4M3 rounding is ~2.5-3.6% RMS per operand element; a dot product averages it,
    # so each GEMM lands at ~3.6% of the result's norm. 6% leaves room without hiding a bug (a
    # wrong tiling or scale gives tens of percent).
    assert rel(y8, y32) < 0.06
    assert rel(x8.grad, x32.grad) < (0.06 if dgrad == "fp8" else 0.01)
    assert rel(layer.weight.grad, ref.weight.grad) < (0.06 if wgrad == "fp8" else 0.01)
    assert layer.path == "emulated"


def test_emulated_forward_is_exactly_the_product_of_the_dequantised_tiles_and_blocks():
    torch.manual_seed(1)
    layer = FP8Linear(256, 128, path="emulated")
    x = torch.randn(32, 256)
    xq, xs = quantize_tiles(x.to(torch.bfloat16))  # activations enter the recipe as bf16
    wq, ws = quantize_blocks(layer.weight.detach())
    expected = dequantize_tiles(xq, xs) @ dequantize_blocks(wq, ws).t()
    assert torch.allclose(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_an_outlier_channel_ruins_a_per_tensor_scale_but_only_its_own_tiles():
    torch.manual_seed(2)
    x = torch.randn(256, 1024) * 0.1  # activations of an ordinary size ...
    x[:, 5] = 1e4  # ... beside one outlier channel, in the first 128-channel tile of every row
    q, s = quantize_tiles(x)
    deq = dequantize_tiles(q, s)
    rest = slice(128, None)  # the tiles without the outlier
    tile_error = rel(deq[:, rest], x[:, rest])
    per_tensor = x.abs().max() / E4M3_MAX  # one scale for the whole tensor
    deq_tensor = (x / per_tensor).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * per_tensor
    tensor_error = rel(deq_tensor[:, rest], x[:, rest])
    assert tile_error < 0.04  # the normal E4M3 level
    assert tensor_error > max(0.1, 4 * tile_error)  # ordinary values pushed into E4M3's subnormal range
    clean_q, clean_s = quantize_tiles(x[:, rest].contiguous())
    assert rel(dequantize_tiles(clean_q, clean_s), x[:, rest]) == pytest.approx(tile_error)


def test_precision_fp8_trains_with_the_emulation_on_cpu_and_records_the_path(tmp_path, shared_cache):
    proc = lab(tmp_path, *TINY, "precision=fp8", "precision.min_features=0", "trainer.deterministic=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["precision.name"] == "fp8"
    assert run.data.tags["precision.fp8_path"] == "emulated"
    assert "precision=fp8: every projection in FP8 (none below precision.min_features=0)" in proc.stdout
    bad = lab(tmp_path, *TINY, "precision=fp8", "precision.wgrad=fp4")
    assert error_line(bad).startswith("error: precision.wgrad='fp4' is not allowed; allowed: fp8, bf16")
    forced = lab(tmp_path, *TINY, "precision=fp8", "precision.path=scaled_mm")
    assert "precision.path='scaled_mm' is not allowed" in error_line(forced)


def test_fp8_rowwise_without_torchao_is_one_clear_error(tmp_path, shared_cache):
    try:
        import torchao  # noqa: F401

        pytest.skip("torchao is installed here")
    except ImportError:
        pass
    proc = lab(tmp_path, *TINY, "precision=fp8_rowwise")
    assert error_line(proc).startswith("error: precision=fp8_rowwise needs torchao (pip install torchao)")


def _grouped_case(seed=3, E=3, K=200, N=160):
    from components.moe import grouped_mm

    torch.manual_seed(seed)
    counts = torch.tensor([150, 0, 90])[:E]
    x = torch.randn(int(counts.sum()), K)
    w = torch.randn(E, K, N) * 0.05
    dy = torch.randn(x.shape[0], N)
    return x, w, counts, dy, lambda a, b, c: grouped_mm(a, b, c, "bmm")


def _grads(fn, x, w, dy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def test_fp8_experts_are_the_grouped_gemm_with_every_operand_rounded_to_e4m3(monkeypatch):
    import components.fp8.format as fp8
    import components.moe as moe

    x, w, counts, dy, gemm = _grouped_case()
    ref = _grads(lambda a, b: gemm(a, b, counts), x, w, dy)
    fast = _grads(lambda a, b: moe.fp8_grouped_mm(a, b, counts, gemm), x, w, dy)
    for got, want in zip(fast, ref, strict=True):  # output, dx, dW: each a few percent off
        assert 0.005 < rel(got, want) < 0.06
    monkeypatch.setattr(fp8, "_cast", lambda t, scale: t / scale)  # no rounding: only the structure
    exact = _grads(lambda a, b: moe.fp8_grouped_mm(a, b, counts, gemm), x, w, dy)
    for got, want in zip(exact, ref, strict=True):
        assert rel(got, want) < 1e-5


def test_fp8_expert_weight_gradients_tile_tokens_within_each_expert():
    import components.moe as moe

    x, w, counts, dy, gemm = _grouped_case()
    x[:150] *= 1e4  # expert 0's tokens are huge; expert 2's follow them directly in the sorted rows
    ref = _grads(lambda a, b: gemm(a, b, counts), x, w, dy)[2]
    got = _grads(lambda a, b: moe.fp8_grouped_mm(a, b, counts, gemm, dgrad="bf16"), x, w, dy)[2]
    assert rel(got[2], ref[2]) < 0.06  # expert 2's tiles never share a scale with expert 0's rows
    assert rel(got[0], ref[0]) < 0.06
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # no tokens, no gradient


def test_projections_reading_one_input_quantise_it_once_and_match_separate_inputs(monkeypatch):
    import components.fp8.linear as fp8

    torch.manual_seed(2)
    calls = []
    real = fp8.quantize_activation
    monkeypatch.setattr(fp8, "quantize_activation", lambda *a: calls.append(1) or real(*a))
    gate, up = FP8Linear(256, 384, path="emulated"), FP8Linear(256, 384, path="emulated")
    x = torch.randn(2, 64, 256, requires_grad=True)
    out = gate(x) * up(x)  # SwiGLU's pattern: one input, two projections
    assert len(calls) == 1
    out.sum().backward()
    assert len(calls) == 3  # plus each layer's output gradient
    grads = (x.grad, gate.weight.grad, up.weight.grad)

    # Two equal but distinct tensors: quantised twice, and every gradient is the same.
    gate.weight.grad = up.weight.grad = None
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    calls.clear()
    (gate(x1) * up(x2)).sum().backward()
    assert len(calls) == 4
    assert torch.equal(x1.grad + x2.grad, grads[0])
    assert torch.equal(gate.weight.grad, grads[1]) and torch.equal(up.weight.grad, grads[2])

    with torch.inference_mode():  # inference tensors have no version counter: no reuse, no error
        y = torch.randn(8, 256)
        assert torch.equal(gate(y), gate(y.clone()))

    # Changed in place between two reads: quantised again (doubling is exact in E4M3: the scales double).
    with torch.no_grad():
        calls.clear()
        y = torch.randn(8, 256)
        before = up(y)
        y.mul_(2)
        assert torch.equal(up(y), 2 * before) and len(calls) == 2


def test_triton_quantisers_place_every_value_and_scale_like_the_reference_in_the_interpreter():
    assert_ok_under_triton_interpreter("tests.fp8_triton_interpreted")


def _fp8_model(*overrides: str):
    from research.config.build import apply_precision_recipe, linear_factory, model_config
    from research.config.compose import compose_run
    from research.model.transformer import Transformer

    cfg = compose_run(["model=tiny", "model.d_model=128", "attention=mla", "ffn=moe", "precision=fp8",
                       *overrides])  # fmt: skip
    model = Transformer(model_config(cfg, 256), linear_factory(cfg))
    before = {name: p for name, p in model.named_parameters()}
    line = apply_precision_recipe(model, cfg)
    assert {name: p for name, p in model.named_parameters()} == before  # the same weights, by name
    return model, line


def test_fp8_keeps_in_bf16_the_layers_below_min_features_and_says_which():
    from components.moe import GroupedExperts

    def fp8_sides(model):
        return sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, FP8Linear)})

    everything, line = _fp8_model("precision.min_features=0")
    assert line.startswith("precision=fp8: every projection in FP8")
    assert (128, 40) in fp8_sides(everything)  # MLA's latent and rope-key down-projection
    assert all(m.fp8 is not None for m in everything.modules() if isinstance(m, GroupedExperts))

    # tiny's widths: d_model 128, latent 32 (+8 rope), experts 64, dense FFN 192, heads 4 x 16
    some, line = _fp8_model("precision.min_features=128")
    assert fp8_sides(some) and all(min(s) >= 128 for s in fp8_sides(some))
    assert all(m.fp8 is None for m in some.modules() if isinstance(m, GroupedExperts))  # 64 wide
    assert "precision.min_features=128 stay bf16" in line and "blocks.*.attn.wkv_a [128->40] x2" in line
    assert line.endswith("blocks.*.ffn.experts [8 experts, 128->64]")  # one MoE layer: no count

    default, line = _fp8_model()  # 2048: nothing in tiny is wide enough
    assert not fp8_sides(default) and "precision.min_features=2048" in line


def test_min_features_must_be_a_whole_number():
    from research.training.preflight import precheck

    assert precheck(["model=tiny", "precision=fp8", "precision.min_features=-1"]) == (
        "precision.min_features=-1 is not allowed; allowed: a whole number, 0 for every layer in FP8"
    )
