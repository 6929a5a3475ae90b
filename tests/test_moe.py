import copy

import pytest
import torch

from components.balance import BalancePolicy, build_balance, max_violation
from components.linear import make_linear
from components.moe import _top_k_indices, build_moe, grouped_mm, moe_reference

C = 32


def make_moe(balance: BalancePolicy | None = None, **kw):
    spec = dict(n_routed_experts=8, top_k=2, expert_dim=16, n_shared_experts=1)
    spec.update(kw)
    moe = build_moe(C, make_linear, balance or BalancePolicy(), **spec)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_each_token_gets_top_k_distinct_experts_with_normalised_weights(score_func):
    moe = make_moe(score_func=score_func, route_scale=2.5)
    _, idx, w = moe.router(torch.randn(100, C))
    assert idx.shape == (100, 2) and w.shape == (100, 2)
    assert (idx[:, 0] != idx[:, 1]).all()
    torch.testing.assert_close(w.sum(-1), torch.full((100,), 2.5))
    assert (w > 0).all()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k_by_argmax_rounds_picks_what_topk_does_best_first(k):
    x = torch.randn(500, 8)
    lowest = torch.finfo(x.dtype).min
    x[:7, 2:] = lowest  # rows with two allowed experts, the rest masked as group-limited routing does
    picked = _top_k_indices(x, k)
    want = x.topk(k, dim=-1)
    torch.testing.assert_close(x.gather(1, picked), want.values, rtol=0, atol=0)  # best first
    assert (picked.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts, masked ties too
    allowed = want.values > lowest
    assert torch.equal(picked[allowed], want.indices[allowed])  # distinct random values: no ties


def test_group_limited_routing_matches_brute_force():
    moe = make_moe(n_routed_experts=16, top_k=4, n_groups=4, topk_groups=2)
    with torch.no_grad():
        moe.router.bias.copy_(0.3 * torch.randn(16))
    x = torch.randn(200, C)
    scores, idx, _ = moe.router(x)
    biased = scores + moe.router.bias
    for n in range(200):
        group_score = biased[n].view(4, 4).topk(2, dim=-1).values.sum(-1)
        allowed = torch.zeros(16, dtype=torch.bool)
        for g in group_score.topk(2).indices:
            allowed[4 * g : 4 * g + 4] = True
        expected = biased[n].masked_fill(~allowed, -1e9).topk(4).indices
        assert set(idx[n].tolist()) == set(expected.tolist())
        assert len({e // 4 for e in idx[n].tolist()}) <= 2


@pytest.mark.parametrize("backend", ["grouped_mm", "padded"])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_vectorised_dispatch_equals_per_expert_loop(backend, score_func):
    moe = make_moe(gemm_backend=backend, score_func=score_func, n_routed_experts=8, top_k=3)
    ref = make_moe(score_func=score_func, n_routed_experts=8, top_k=3)
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(3, 20, C)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    y, y_ref = moe(x), moe_reference(ref, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (name, p), p_ref in zip(moe.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_grouped_mm_fallback_handles_empty_groups():
    x, w = torch.randn(10, 8), torch.randn(4, 8, 5)
    counts = torch.tensor([3, 0, 7, 0])
    expected = torch.cat((x[:3] @ w[0], x[3:] @ w[2]))
    torch.testing.assert_close(grouped_mm(x, w, counts, backend="padded"), expected)


def test_bias_changes_selection_but_not_combine_weights():
    moe = make_moe(route_scale=1.5)
    x = torch.randn(300, C)
    scores, idx0, w0 = moe.router(x)
    with torch.no_grad():
        moe.router.bias[5] = 10.0  # every token must now pick expert 5
    scores_b, idx1, w1 = moe.router(x)
    torch.testing.assert_close(scores_b, scores)
    assert (idx1 == 5).any(-1).all() and not (idx0 == 5).any(-1).all()
    # the weights come from the unbiased scores of the selected experts, normalised among them
    selected = scores.gather(1, idx1)
    torch.testing.assert_close(w1, 1.5 * selected / selected.sum(-1, keepdim=True))
    # where the selection did not change, neither did the weights
    same = (idx0.sort(-1).values == idx1.sort(-1).values).all(-1)
    assert same.any()
    torch.testing.assert_close(w1[same].sort(-1).values, w0[same].sort(-1).values)
    # without normalisation the weight of a selected expert is exactly its affinity
    moe_raw = make_moe(norm_topk=False)
    with torch.no_grad():
        moe_raw.router.bias[5] = 10.0
    s, idx, w = moe_raw.router(x)
    torch.testing.assert_close(w, s.gather(1, idx))


def test_load_counts_and_their_accumulation():
    moe = make_moe()
    x = torch.randn(2, 25, C)
    moe.eval()
    moe(x)
    assert moe.last_load.sum() == 2 * 25 * 2 and moe.load_since_update.sum() == 0  # eval never accumulates
    moe.train()
    moe(x)
    moe(x)
    torch.testing.assert_close(moe.load_since_update, 2 * moe.last_load)
    assert moe.balance_loss is None  # balance "none"


def _skewed_moe(gamma: float) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    moe = build_moe(
        C,
        make_linear,
        build_balance({"name": "aux_free", "gamma": gamma}),
        n_routed_experts=16,
        top_k=2,
        expert_dim=16,
    )
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    u = torch.nn.functional.normalize(torch.randn(C), dim=0)
    with torch.no_grad():
        moe.router.weight[:4] += u  # experts 0-3 score high for every token
    return moe.train(), u


@pytest.mark.parametrize("gamma", [0.002])
def test_aux_free_bias_fixes_a_skewed_router(gamma):
    moe, u = _skewed_moe(gamma)
    curve, recent = [], torch.zeros(16)
    for step in range(200):
        with torch.no_grad():
            moe((torch.randn(2048, C) + 2 * u)[None])
        curve.append(max_violation(moe.last_load))
        if step >= 180:
            recent += moe.last_load
        moe.update_bias()
    shown = " ".join(f"{v:.2f}" for v in curve[::10])
    assert curve[0] > 2.0, f"router not skewed to begin with: {shown}"
    assert min(curve) < 0.2, f"MaxVio (every 10th update): {shown}"
    assert max_violation(recent) < 0.2, (
        f"MaxVio over the last 20 updates {max_violation(recent):.3f}; {shown}"
    )
    assert moe.router.bias[:4].max() < moe.router.bias[4:].min()  # the favoured experts were pushed down


def test_no_balance_leaves_the_skew():
    moe, u = _skewed_moe(0.0)
    for _ in range(20):
        with torch.no_grad():
            moe((torch.randn(2048, C) + 2 * u)[None])
        moe.update_bias()
    assert max_violation(moe.last_load) > 2.0
    assert (moe.router.bias == 0).all()


def test_routing_is_fp32_under_autocast_so_compiled_routes_as_eager_does():
    """The router's logits stay fp32 under bf16 autocast (DeepSeek-V3 keeps gating in high
    precision). In bf16 they tie often among the experts; eager and compiled code break the ties
    differently, and then send tokens to other experts: the layer's output and gradients moved by
    ~6% between the two, which hid real faults of the compiled path below the noise."""
    torch.manual_seed(0)
    C = 64
    moe = build_moe(C, make_linear, BalancePolicy(), n_routed_experts=16, top_k=2, expert_dim=64)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=C**-0.5)
    x = torch.randn(4, 256, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _, _ = moe.router(x.view(-1, C))
    assert scores.dtype == torch.float32

    def step(m):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        (y.float() * torch.linspace(-1, 1, C)).sum().backward()
        return y.detach().float(), xi.grad, m.last_load.clone(), {n: p.grad for n, p in m.named_parameters()}

    compiled = copy.deepcopy(moe)
    compiled.compile()
    (y0, dx0, load0, g0), (y1, dx1, load1, g1) = step(moe), step(compiled)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert torch.equal(load0, load1)  # the same tokens went to the same experts
    assert rel(y1, y0) < 1e-2 and rel(dx1, dx0) < 1e-2
    for name in g0:
        assert rel(g1[name], g0[name]) < 2e-2, name
