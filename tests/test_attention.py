import copy

import pytest
import torch
from torch.nn.attention import SDPBackend

from components.attention import ATTENTION, Attention, causal_attention
from components.linear import make_linear
from components.rope import RotaryEmbedding
from research.model.transformer import Transformer
from tests.conftest import ATTENTION_SPECS, tiny_config

D_MODEL = 32


def build(spec):
    return ATTENTION.build(spec, d_model=D_MODEL, linear=make_linear)


@pytest.mark.parametrize("kind", sorted(ATTENTION_SPECS))
def test_attention_is_causal(kind):
    attn = build(ATTENTION_SPECS[kind])
    x = torch.randn(2, 12, D_MODEL)
    positions = torch.arange(12)
    t = 7
    x2 = x.clone()
    x2[:, t] += torch.randn(D_MODEL)
    y, y2 = attn(x, positions), attn(x2, positions)
    torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-6)
    assert (y2[:, t:] - y[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it


@pytest.mark.parametrize("kind", sorted(ATTENTION_SPECS))
def test_model_is_causal(kind):
    model = Transformer(tiny_config(kind, "moe", mtp_depth=1)).eval()
    idx = torch.randint(0, 64, (2, 16))
    idx2 = idx.clone()
    idx2[:, 9] = (idx[:, 9] + 1) % 64
    with torch.no_grad():
        a, b = model(idx).logits, model(idx2).logits
    torch.testing.assert_close(b[:, :9], a[:, :9], rtol=0, atol=1e-6)
    assert (b[:, 9:] - a[:, 9:]).abs().max() > 1e-4


@torch.no_grad()
def decode(model, idx, prefill, cache=None):
    """Logits of ``idx`` [B, T] from a prefill of ``prefill`` tokens, then one token at a time."""
    B, T = idx.shape
    model.reserve_positions(T)
    cache = model.new_cache(B, T) if cache is None else cache

    def run(t0, t1):
        positions = torch.arange(t0, t1).expand(B, t1 - t0)
        return model.logits(model.trunk(idx[:, t0:t1], positions, cache))

    return torch.cat([run(0, prefill), *(run(t, t + 1) for t in range(prefill, T))], dim=1)


@pytest.mark.parametrize("kind", sorted(ATTENTION_SPECS))
def test_cached_decoding_equals_training_path(kind):
    """Prefill 5 tokens, then decode one token at a time: logits equal one full forward.
    For MLA the cached path is the absorbed one, attending over the latent only."""
    model = Transformer(tiny_config(kind, "moe", n_layers=3)).eval()
    idx = torch.randint(0, 64, (2, 13))
    cache = model.new_cache(2, 13)
    with torch.no_grad():
        full = model(idx).logits
    torch.testing.assert_close(decode(model, idx, prefill=5, cache=cache), full, rtol=0, atol=1e-5)
    if kind == "mla":
        attn = model.blocks[0].attn
        assert set(cache[0]) == {"latent"}  # the latent and the rope key, nothing per head
        assert cache[0]["latent"].shape == (2, 13, attn.kv_lora_rank + attn.rope_dim)


@pytest.mark.parametrize("kind", sorted(ATTENTION_SPECS))
def test_decoding_past_the_rope_tables_lengthens_them(kind):
    model = Transformer(tiny_config(kind, n_layers=2)).eval()
    short = copy.deepcopy(model)
    for rope in short.ropes:  # tables as if built for 4 positions only
        rope.cos_table, rope.sin_table = rope.cos_table[:4], rope.sin_table[:4]
    idx = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        full = model(idx).logits
    torch.testing.assert_close(decode(short, idx, prefill=3), full, rtol=0, atol=1e-6)
    assert all(rope.cos_table.shape[0] == 11 for rope in short.ropes)  # reserved once, for every position


def test_rope_tables_hold_each_positions_angles():
    rope = RotaryEmbedding(8, theta=500.0, max_positions=16)
    rope.reserve(3000)
    positions = torch.tensor([0, 1, 15, 16, 2999])
    angles = positions[:, None].double() * 500.0 ** (-torch.arange(0, 8, 2).double() / 8)
    cos, sin = rope(positions)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-3)  # fp32 angles near 3000
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-3)
    torch.testing.assert_close(cos[:3].double(), angles[:3].cos(), rtol=0, atol=1e-6)


def test_gqa_with_all_kv_heads_equals_mha():
    mha = build({"name": "mha", "n_heads": 4})
    gqa = build({"name": "gqa", "n_heads": 4, "n_kv_heads": 4})
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 10, D_MODEL)
    torch.testing.assert_close(gqa(x, torch.arange(10)), mha(x, torch.arange(10)), rtol=0, atol=0)


def test_gqa_shares_kv_heads():
    """GQA with 2 kv heads = MHA whose k/v heads are each repeated for 2 query heads."""
    gqa = build({"name": "gqa", "n_heads": 4, "n_kv_heads": 2})
    mha = build({"name": "mha", "n_heads": 4})
    sd = gqa.state_dict()
    for w in ("wk", "wv"):  # [2 * 8, C] -> repeat each kv head's rows for its query heads
        sd[f"{w}.weight"] = (
            sd[f"{w}.weight"].view(2, 8, D_MODEL).repeat_interleave(2, dim=0).reshape(32, D_MODEL)
        )
    mha.load_state_dict(sd)
    x = torch.randn(2, 10, D_MODEL)
    torch.testing.assert_close(gqa(x, torch.arange(10)), mha(x, torch.arange(10)), rtol=1e-5, atol=1e-6)


def test_mla_shares_one_rope_key_and_uses_the_full_qk_scale():
    attn = build(ATTENTION_SPECS["mla"])
    assert attn.wkv_a.weight.shape[0] == attn.kv_lora_rank + attn.rope_dim  # one rope key, not per head
    assert attn.scale == pytest.approx((8 + 4) ** -0.5)
    mla_no_q = build({**ATTENTION_SPECS["mla"], "q_lora_rank": 0})
    assert hasattr(mla_no_q, "wq") and not hasattr(mla_no_q, "wq_a")


def test_kv_cache_bytes_per_token():
    assert build({"name": "mha", "n_heads": 4}).kv_cache_bytes_per_token() == 2 * 4 * 8 * 2
    assert build({"name": "gqa", "n_heads": 4, "n_kv_heads": 2}).kv_cache_bytes_per_token() == 2 * 2 * 8 * 2
    assert build(ATTENTION_SPECS["mla"]).kv_cache_bytes_per_token() == (16 + 4) * 2
    assert build(ATTENTION_SPECS["mla"]).kv_cache_bytes_per_token(bytes_per_value=4) == (16 + 4) * 4
    model = Transformer(tiny_config("mla", n_layers=3))
    assert model.kv_cache_bytes_per_token() == 3 * (16 + 4) * 2


def test_mla_zero_padded_values_change_nothing():
    # MLA pads v to the q/k head dim for the flash kernel, which refuses unequal head dims (the
    # math kernel takes them unpadded): the same output and gradients.
    spec = {**ATTENTION_SPECS["mla"], "v_head_dim": 4}  # narrower than nope 8 + rope 4
    plain, padded = build(spec), build(spec)
    padded.load_state_dict(plain.state_dict())
    plain.sdpa_kernel, padded.sdpa_kernel = SDPBackend.MATH, SDPBackend.FLASH_ATTENTION
    x = torch.randn(2, 10, D_MODEL)
    y, y_padded = plain(x, torch.arange(10)), padded(x, torch.arange(10))
    torch.testing.assert_close(y_padded, y, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_padded.backward(g)
    for (name, p), p_padded in zip(plain.named_parameters(), padded.parameters(), strict=True):
        torch.testing.assert_close(p_padded.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


class OneKVHead(Attention):
    """A throwaway variant (multi-query attention, no rope): all the platform needs of one is the
    ``Attention`` contract and a registered builder."""

    def __init__(self, d_model: int, n_heads: int, linear):
        head_dim = d_model // n_heads
        super().__init__(n_heads, head_dim, head_dim)
        self.wq, self.wkv, self.wo = (
            linear(d_model, d_model),
            linear(d_model, 2 * head_dim),
            linear(d_model, d_model),
        )

    def kv_cache_values_per_token(self) -> int:
        return 2 * self.qk_head_dim

    def forward(self, x, positions, cache=None):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # [B, H, T, D]
        k, v = self.wkv(x).view(B, T, 1, 2, -1).unbind(3)  # each [B, T, 1, D]
        y = causal_attention(q, k.transpose(1, 2), v.transpose(1, 2), kernel=self.sdpa_kernel)  # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


@pytest.fixture
def one_kv_head():
    ATTENTION.register("one_kv_head")(lambda d_model, linear, n_heads=4: OneKVHead(d_model, n_heads, linear))
    yield {"name": "one_kv_head", "n_heads": 4}
    del ATTENTION._builders["one_kv_head"]  # the registry is process-wide


def test_a_new_attention_variant_needs_only_its_class_and_builder(one_kv_head):
    from research.training import converters

    model = Transformer(tiny_config(attention=one_kv_head)).train()
    idx = torch.randint(0, 64, (2, 12))
    model(idx, torch.roll(idx, -1, dims=1)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.kv_cache_bytes_per_token() == 2 * (2 * 8) * 2  # layers x (k + v of one 8-wide head) x bf16
    assert model.flops_per_token(12) > 3 * 2 * sum(p.numel() for p in model.blocks.parameters())
    done = converters.convert(model, {"attention_kernel": "math"}, converters.Target(torch.device("cpu")))
    assert done.applied == ["attention_kernel"]
    assert {b.attn.sdpa_kernel for b in model.blocks} == {SDPBackend.MATH}
