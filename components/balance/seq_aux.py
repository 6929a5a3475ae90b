"""DeepSeek-V3's sequence-wise balance loss: the batch-wise loss with each sequence balanced alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.balance.rule import BALANCE, BalanceRule, Routing, balance_loss, check_weight


@dataclass(frozen=True)
class SeqAux(BalanceRule):
    alpha: float

    def loss(self, routing: Routing) -> torch.Tensor:
        B = routing.batch_size
        E, K = routing.scores.shape[-1], routing.topk_idx.shape[-1]
        per_seq = balance_loss(routing.scores.view(B, -1, E), routing.topk_idx.view(B, -1, K), E)  # [B]
        return self.alpha * per_seq.mean()


@BALANCE.register("seq_aux")
def build_seq_aux(alpha: float = 1e-4) -> SeqAux:
    check_weight("balance.alpha", alpha)
    return SeqAux(alpha)
