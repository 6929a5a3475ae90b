"""The classic batch-wise balance loss, alpha * sum_i f_i * P_i over every token of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.balance.rule import BALANCE, BalanceRule, Routing, balance_loss, check_weight


@dataclass(frozen=True)
class AuxLoss(BalanceRule):
    alpha: float

    def loss(self, routing: Routing) -> torch.Tensor:
        E = routing.scores.shape[-1]
        return self.alpha * balance_loss(routing.scores[None], routing.topk_idx[None], E)[0]


@BALANCE.register("aux_loss")
def build_aux_loss(alpha: float = 1e-3) -> AuxLoss:
    check_weight("balance.alpha", alpha)
    return AuxLoss(alpha)
