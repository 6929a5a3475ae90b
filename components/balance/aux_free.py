"""DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores for top-k
selection only, nudged after every step by gamma * sign(mean_load - load_i); no gradient involved."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from components.balance.rule import BALANCE, BalanceRule, check_weight


@dataclass(frozen=True)
class AuxFree(BalanceRule):
    gamma: float  # bias step per optimiser step (0: the bias never moves)

    @torch.no_grad()
    def update_bias(self, bias: torch.Tensor, load: torch.Tensor) -> None:
        """bias += gamma * sign(mean_load - load), with load summed over data-parallel ranks."""
        if self.gamma == 0:
            return
        load = load.float().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        bias += self.gamma * torch.sign(load.mean() - load)
        # Only differences between experts matter for top-k; centring keeps the bias from drifting
        # as a whole (torchtitan does the same).
        bias -= bias.mean()


@BALANCE.register("aux_free")
def build_aux_free(gamma: float = 1e-3) -> AuxFree:
    check_weight("balance.gamma", gamma)
    return AuxFree(gamma)
