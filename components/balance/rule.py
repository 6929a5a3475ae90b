"""What a balancing rule is: a loss on one layer's routing, a step of its selection bias, or both.

A policy is a list of rules (``aux_free+seq_aux`` is two), so a new rule is one class in a file of
its own beside this one, registered under its name; nothing else needs to know it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from components.registry import Registry, require

BALANCE = Registry("balance")


class Routing(NamedTuple):
    """One MoE layer's routing of N = B * T tokens over E experts, K picked per token."""

    logits: torch.Tensor  # [N, E] router logits (fp32)
    scores: torch.Tensor  # [N, E] affinities: sigmoid or softmax of the logits
    topk_idx: torch.Tensor  # [N, K] selected experts
    batch_size: int  # B, for rules that balance each sequence alone


class BalanceRule:
    """A rule overrides ``loss``, ``update_bias`` or both; the defaults do nothing."""

    def loss(self, routing: Routing) -> torch.Tensor | None:
        """A scalar added to the training loss, or None."""
        return None

    @torch.no_grad()
    def update_bias(self, bias: torch.Tensor, load: torch.Tensor) -> None:
        """Move the selection ``bias`` [E] given tokens per expert ``load`` [E] since the last step."""


def check_weight(key: str, value: float) -> None:
    require(value >= 0, key, value, "a non-negative number")


def balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """sum_i f_i * P_i per group of tokens; ``scores`` [G, N, E], ``topk_idx`` [G, N, K] -> [G].

    f_i = E / (K N) * (tokens routed to i), so f is 1 for every expert under perfect balance;
    P_i = mean over tokens of the normalised affinity s_i / sum_j s_j.
    """
    G, N, K = topk_idx.shape
    counts = torch.zeros(G, n_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(
        1, topk_idx.reshape(G, N * K), torch.ones_like(topk_idx, dtype=scores.dtype).view(G, -1)
    )
    f = counts * (n_experts / (K * N))
    P = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)
    return (f * P).sum(-1)


@dataclass(frozen=True)
class BalancePolicy:
    """The rules one MoE layer applies, in order; no rules is ``balance=none``."""

    rules: tuple[BalanceRule, ...] = ()

    @property
    def has_loss(self) -> bool:
        return any(type(r).loss is not BalanceRule.loss for r in self.rules)

    def loss(self, routing: Routing) -> torch.Tensor | None:
        losses = [loss for r in self.rules if (loss := r.loss(routing)) is not None]
        return torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def update_bias(self, bias: torch.Tensor, load: torch.Tensor) -> None:
        for r in self.rules:
            r.update_bias(bias, load)
