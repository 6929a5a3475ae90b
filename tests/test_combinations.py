"""Every point of the ablation grid builds, and trains one step with finite loss and gradients."""

import itertools

import pytest
import torch

from research.model.transformer import Transformer
from tests.conftest import tiny_config

GRID = list(
    itertools.product(
        ["mha", "gqa", "mla"],
        ["dense", "moe"],
        ["none", "aux_loss", "aux_free", "aux_free+seq_aux", "aux_free+z_loss"],
        [0, 1, 2],
    )
)


@pytest.mark.parametrize(("attention", "ffn", "balance", "mtp_depth"), GRID)
def test_builds_and_runs_forward_backward(attention, ffn, balance, mtp_depth):
    model = Transformer(tiny_config(attention, ffn, balance, mtp_depth)).train()
    idx = torch.randint(0, 64, (2, 12))
    out = model(idx, targets=torch.roll(idx, -1, dims=1))
    assert out.logits.shape == (2, 12, 64)
    assert torch.isfinite(out.loss)
    assert (out.mtp_loss is not None) == (mtp_depth > 0)
    has_balance_loss = ffn == "moe" and balance in ("aux_loss", "aux_free+seq_aux", "aux_free+z_loss")
    assert (out.balance_loss is not None) == has_balance_loss
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    model.update_balance_bias()
    bias_moved = any(m.router.bias.abs().sum() > 0 for m in model.moe_layers())
    assert bias_moved == (ffn == "moe" and balance.startswith("aux_free"))
