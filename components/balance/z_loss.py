"""ST-MoE's router z-loss (Zoph et al., 2022): weight * mean over tokens of logsumexp(logits)^2.

It does not balance load; it keeps router logits small, so that the routing stays stable in low
precision. Compose it with a balancing rule: ``aux_free+z_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.balance.rule import BALANCE, BalanceRule, Routing, check_weight


@dataclass(frozen=True)
class ZLoss(BalanceRule):
    z_weight: float

    def loss(self, routing: Routing) -> torch.Tensor:
        return self.z_weight * routing.logits.float().logsumexp(dim=-1).square().mean()


@BALANCE.register("z_loss")
def build_z_loss(z_weight: float = 1e-3) -> ZLoss:
    check_weight("balance.z_weight", z_weight)
    return ZLoss(z_weight)
