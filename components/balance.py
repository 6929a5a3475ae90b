"""Expert load balancing for DeepSeekMoE: auxiliary losses and the auxiliary-loss-free bias.

A ``LoadBalance`` is a policy object, not a module: the MoE layer asks it for a loss on each
training forward and, after each optimiser step, lets it move the layer's selection bias.

- ``aux_loss``: the classic batch-wise balance loss, alpha * sum_i f_i * P_i.
- ``seq_aux``: DeepSeek-V3's sequence-wise version of the same loss (each sequence balanced alone).
- ``aux_free``: a per-expert bias added to the scores for top-k selection only, nudged after every
  step by gamma * sign(mean_load - load_i); no gradient involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from components.registry import Registry, require

BALANCE = Registry("balance")


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load; 0 for an idle layer."""
    load = load.float()
    mean = load.mean()
    return 0.0 if mean <= 0 else float((load.max() - mean) / mean)


def _balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
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
class LoadBalance:
    aux_alpha: float = 0.0  # weight of the batch-wise balance loss
    seq_alpha: float = 0.0  # weight of the sequence-wise balance loss
    bias_gamma: float = 0.0  # step of the aux-free bias update (0: the bias never moves)

    @property
    def has_loss(self) -> bool:
        return self.aux_alpha > 0 or self.seq_alpha > 0

    def loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, batch_size: int) -> torch.Tensor | None:
        """Balance loss for one layer; ``scores`` [N, E] are the raw affinities, ``topk_idx`` [N, K]."""
        if not self.has_loss:
            return None
        E = scores.shape[-1]
        total = scores.new_zeros(())
        if self.aux_alpha > 0:
            total = total + self.aux_alpha * _balance_loss(scores[None], topk_idx[None], E)[0]
        if self.seq_alpha > 0:
            per_seq = _balance_loss(
                scores.view(batch_size, -1, E), topk_idx.view(batch_size, -1, topk_idx.shape[-1]), E
            )
            total = total + self.seq_alpha * per_seq.mean()
        return total

    @torch.no_grad()
    def update_bias(self, bias: torch.Tensor, load: torch.Tensor) -> None:
        """bias += gamma * sign(mean_load - load), with load summed over data-parallel ranks."""
        if self.bias_gamma == 0:
            return
        load = load.float().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        bias += self.bias_gamma * torch.sign(load.mean() - load)
        # Only differences between experts matter for top-k; centring keeps the bias from drifting
        # as a whole (torchtitan does the same).
        bias -= bias.mean()


def _check_weight(key: str, value: float) -> None:
    require(value >= 0, key, value, "a non-negative number")


@BALANCE.register("none")
def build_none() -> LoadBalance:
    return LoadBalance()


@BALANCE.register("aux_loss")
def build_aux_loss(alpha: float = 1e-3) -> LoadBalance:
    _check_weight("balance.alpha", alpha)
    return LoadBalance(aux_alpha=alpha)


@BALANCE.register("seq_aux")
def build_seq_aux(alpha: float = 1e-4) -> LoadBalance:
    _check_weight("balance.alpha", alpha)
    return LoadBalance(seq_alpha=alpha)


@BALANCE.register("aux_free")
def build_aux_free(gamma: float = 1e-3) -> LoadBalance:
    _check_weight("balance.gamma", gamma)
    return LoadBalance(bias_gamma=gamma)


@BALANCE.register("aux_free+seq_aux")
def build_aux_free_seq_aux(gamma: float = 1e-3, alpha: float = 1e-4) -> LoadBalance:
    _check_weight("balance.gamma", gamma)
    _check_weight("balance.alpha", alpha)
    return LoadBalance(seq_alpha=alpha, bias_gamma=gamma)
