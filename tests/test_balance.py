import torch

from components.balance import BALANCE, LoadBalance, max_violation
from components.linear import make_linear
from components.moe import build_moe


def manual_balance_loss(scores, idx, E, K):
    """sum_i f_i P_i written out with loops, from the formulas in the DeepSeek-V3 report."""
    N = scores.shape[0]
    total = 0.0
    for i in range(E):
        f_i = E / (K * N) * sum(int((idx[t] == i).any()) for t in range(N))
        P_i = sum(float(scores[t, i] / scores[t].sum()) for t in range(N)) / N
        total += f_i * P_i
    return total


def test_aux_loss_matches_the_formula():
    E, K, N = 6, 2, 40
    scores = torch.rand(N, E)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    loss = LoadBalance(aux_alpha=0.01).loss(scores, idx, batch_size=1)
    assert abs(loss.item() - 0.01 * manual_balance_loss(scores, idx, E, K)) < 1e-6


def test_seq_aux_balances_each_sequence_alone():
    E, K, T = 4, 1, 8
    scores = torch.full((2 * T, E), 0.5)
    scores[:T, 0] = scores[T:, 1] = 0.9  # each sequence prefers its own expert...
    idx = torch.cat((torch.zeros(T, 1), torch.ones(T, 1))).long()  # ...and sends everything there
    seq = LoadBalance(seq_alpha=1.0).loss(scores, idx, batch_size=2)
    batch = LoadBalance(aux_alpha=1.0).loss(scores, idx, batch_size=2)
    expected_seq = (
        manual_balance_loss(scores[:T], idx[:T], E, K) + manual_balance_loss(scores[T:], idx[T:], E, K)
    ) / 2
    assert abs(seq.item() - expected_seq) < 1e-6
    assert seq > batch  # the batch as a whole looks better balanced than each sequence is


def test_perfect_balance_gives_alpha():
    E = 4
    idx = torch.tensor([[0, 1], [2, 3]] * 5)  # top-2, every expert chosen 5 times
    loss = LoadBalance(aux_alpha=0.3).loss(torch.ones(10, E), idx, batch_size=1)
    assert abs(loss.item() - 0.3) < 1e-6


def test_balance_loss_trains_the_router():
    moe = build_moe(
        16,
        make_linear,
        BALANCE.build({"name": "aux_loss", "alpha": 0.01}),
        n_routed_experts=4,
        top_k=2,
        expert_dim=8,
    )
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.train()
    moe(torch.randn(2, 10, 16))
    moe.balance_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.w_down.grad is None  # the loss only reaches the router


def test_bias_update_rule():
    bias = torch.zeros(4)
    LoadBalance(bias_gamma=0.1).update_bias(bias, torch.tensor([10.0, 30.0, 20.0, 20.0]))
    # sign(mean - load) = (+1, -1, 0, 0) * 0.1, then centred (mean already 0)
    torch.testing.assert_close(bias, torch.tensor([0.1, -0.1, 0.0, 0.0]))
    LoadBalance(bias_gamma=0.1).update_bias(bias, torch.tensor([10.0, 30.0, 30.0, 30.0]))
    assert abs(bias.mean()) < 1e-7  # centred
    frozen = bias.clone()
    LoadBalance().update_bias(bias, torch.tensor([10.0, 30.0, 30.0, 30.0]))
    torch.testing.assert_close(bias, frozen)


def test_named_policies():
    assert BALANCE.build({"name": "none"}) == LoadBalance()
    assert BALANCE.build({"name": "aux_free"}).bias_gamma == 1e-3
    combined = BALANCE.build({"name": "aux_free+seq_aux"})
    assert combined.bias_gamma == 1e-3 and combined.seq_alpha == 1e-4 and combined.aux_alpha == 0
    assert BALANCE.build({"name": "seq_aux"}).seq_alpha == 1e-4


def test_max_violation():
    assert max_violation(torch.tensor([10, 10, 10, 10])) == 0
    assert abs(max_violation(torch.tensor([20, 10, 5, 5])) - 1.0) < 1e-6
    assert max_violation(torch.zeros(4)) == 0
