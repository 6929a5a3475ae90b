import pytest
import torch

from components.balance import BalancePolicy, Routing, build_balance, max_violation
from components.balance.aux_free import AuxFree
from components.balance.aux_loss import AuxLoss
from components.balance.seq_aux import SeqAux
from components.balance.z_loss import ZLoss
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


def routing(scores, idx, batch_size=1, logits=None):
    return Routing(scores.logit() if logits is None else logits, scores, idx, batch_size)


def test_aux_loss_matches_the_formula():
    E, K, N = 6, 2, 40
    scores = torch.rand(N, E)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    loss = AuxLoss(0.01).loss(routing(scores, idx))
    assert abs(loss.item() - 0.01 * manual_balance_loss(scores, idx, E, K)) < 1e-6


def test_seq_aux_balances_each_sequence_alone():
    E, K, T = 4, 1, 8
    scores = torch.full((2 * T, E), 0.5)
    scores[:T, 0] = scores[T:, 1] = 0.9  # each sequence prefers its own expert...
    idx = torch.cat((torch.zeros(T, 1), torch.ones(T, 1))).long()  # ...and sends everything there
    seq = SeqAux(1.0).loss(routing(scores, idx, 2))
    batch = AuxLoss(1.0).loss(routing(scores, idx, 2))
    expected_seq = (
        manual_balance_loss(scores[:T], idx[:T], E, K) + manual_balance_loss(scores[T:], idx[T:], E, K)
    ) / 2
    assert abs(seq.item() - expected_seq) < 1e-6
    assert seq > batch  # the batch as a whole looks better balanced than each sequence is


def test_perfect_balance_gives_alpha():
    E = 4
    idx = torch.tensor([[0, 1], [2, 3]] * 5)  # top-2, every expert chosen 5 times
    loss = AuxLoss(0.3).loss(routing(torch.full((10, E), 0.5), idx))
    assert abs(loss.item() - 0.3) < 1e-6


def test_balance_loss_trains_the_router():
    moe = build_moe(
        16,
        make_linear,
        build_balance({"name": "aux_loss", "alpha": 0.01}),
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
    AuxFree(0.1).update_bias(bias, torch.tensor([10.0, 30.0, 20.0, 20.0]))
    # sign(mean - load) = (+1, -1, 0, 0) * 0.1, then centred (mean already 0)
    torch.testing.assert_close(bias, torch.tensor([0.1, -0.1, 0.0, 0.0]))
    AuxFree(0.1).update_bias(bias, torch.tensor([10.0, 30.0, 30.0, 30.0]))
    assert abs(bias.mean()) < 1e-7  # centred
    frozen = bias.clone()
    BalancePolicy().update_bias(bias, torch.tensor([10.0, 30.0, 30.0, 30.0]))
    torch.testing.assert_close(bias, frozen)


def test_named_policies():
    assert build_balance({"name": "none"}) == BalancePolicy()
    assert build_balance({"name": "aux_free"}).rules == (AuxFree(1e-3),)
    assert build_balance({"name": "aux_free+seq_aux"}).rules == (AuxFree(1e-3), SeqAux(1e-4))
    assert build_balance({"name": "seq_aux", "alpha": 0.5}).rules == (SeqAux(0.5),)
    assert build_balance({"name": "aux_free+z_loss", "gamma": 0.1}).rules == (AuxFree(0.1), ZLoss(1e-3))
    assert not build_balance({"name": "aux_free"}).has_loss and build_balance({"name": "z_loss"}).has_loss


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"name": "aux_free+bogus"}, "balance.name='aux_free+bogus'"),
        ({"name": "aux_free+aux_free"}, "balance.name='aux_free+aux_free'"),
        ({"name": "aux_free", "alpha": 0.1}, "balance.alpha=0.1"),
        ({"name": "z_loss", "z_weight": -1.0}, "balance.z_weight=-1.0"),
    ],
)
def test_a_bad_policy_names_the_key_and_what_is_allowed(spec, named):
    with pytest.raises(ValueError, match="allowed") as e:
        build_balance(spec)
    assert str(e.value).startswith(named) and "\n" not in str(e.value)


def test_z_loss_matches_the_formula_and_shrinks_the_router_logits():
    """ST-MoE: L_z = 1/N sum_t (log sum_e exp x_te)^2. Trained on alone, it drives the logits down."""
    logits = torch.randn(20, 6) * 3
    expected = sum(float(torch.log(torch.exp(row).sum())) ** 2 for row in logits) / 20
    got = ZLoss(0.01).loss(routing(logits.sigmoid(), torch.zeros(20, 1, dtype=torch.long), logits=logits))
    assert abs(got.item() - 0.01 * expected) < 1e-4

    torch.manual_seed(0)
    moe = build_moe(16, make_linear, build_balance({"name": "z_loss", "z_weight": 1.0}), n_routed_experts=4,
                    top_k=2, expert_dim=8)  # fmt: skip
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    x = torch.randn(2, 10, 16)
    opt = torch.optim.SGD([moe.router.weight], lr=0.01)
    moe.train()
    first = None
    for _ in range(20):
        moe(x)
        first = moe.balance_loss.item() if first is None else first
        opt.zero_grad()
        moe.balance_loss.backward()
        opt.step()
    assert moe.balance_loss.item() < 0.5 * first


def test_max_violation():
    assert max_violation(torch.tensor([10, 10, 10, 10])) == 0
    assert abs(max_violation(torch.tensor([20, 10, 5, 5])) - 1.0) < 1e-6
    assert max_violation(torch.zeros(4)) == 0
