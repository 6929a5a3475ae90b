"""MTP self-speculative decoding: the MTP modules draft D tokens, the main model checks them in one
forward pass, and every draft up to the first miss is kept, plus the main model's own next token.
Greedy, so the output is the plain greedy output token for token; only the speed changes.

Depth k at position i reads the depth k-1 state at i and token i+k and predicts token i+k+1
(``components.mtp``). With n tokens final (the main cache holds 0..n-1, token n is known), one round:

    draft:  depth 1..D at position n-1 give d[n+1] .. d[n+D] (depth k reads d[n+k-1])
    verify: the main model over [t[n], d[n+1] .. d[n+D]] at positions n..n+D gives g[n+1] .. g[n+D+1]
    accept: a = leading drafts equal to g; the row gains t[n+1..n+a] and g[n+a+1]: n += a + 1

A depth's cache entry at i is final once token i+k is. Each round each depth recomputes a window of
the last 2D positions, which holds every entry a round can leave unsettled (a depth-k entry settles
at most D + k positions after it is first written), so rows at different lengths keep static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from research.errors import DecodeError
from research.inference.engine import Decoder, check_prompts
from research.model.transformer import Transformer


@dataclass(frozen=True)
class Speculation:
    tokens: list[list[int]]  # max_new per prompt
    acceptance: list[float]  # per depth k: the share of rounds whose k-th draft was kept
    rounds: int  # verify passes (of rows still generating)

    @property
    def tokens_per_round(self) -> float:
        return 1 + sum(self.acceptance)


def require_mtp(model: Transformer) -> int:
    if model.mtp_depth == 0:
        raise DecodeError("speculative decoding drafts with the MTP modules; this model has mtp.depth=0 "
                          "(train one with mtp=d1 or mtp=d2)")  # fmt: skip
    return model.mtp_depth


@torch.no_grad()
def speculative_generate(
    model: Transformer, prompts: list[list[int]], max_new: int, context: int | None = None
) -> Speculation:
    """Greedy decoding of ``max_new`` tokens per prompt, drafted by the MTP modules."""
    D = require_mtp(model)
    check_prompts(prompts, context)
    B, T, W = len(prompts), max(map(len, prompts)), 2 * D
    S = max(T + max_new + 2 * D + 2, W)  # every position a round writes, rows frozen when done
    main = Decoder(model, B, S)
    weight = model.embed.weight
    caches = model.new_cache(B, S, mtp=True)[model.cfg.n_layers :]  # one per depth
    rows = torch.arange(B, device=weight.device)

    logits, h, idx = main.prefill_states(prompts)
    start = main.lengths.clone()  # each prompt's length
    n = start.clone()  # tokens final per row: positions 0..n-1 cached, token n known
    tok = torch.zeros(B, S + D + 2, dtype=torch.long, device=weight.device)
    tok[:, :T] = idx
    tok[rows, n] = logits.argmax(dim=-1)
    states = torch.zeros(D, B, S, model.cfg.d_model, dtype=h.dtype, device=weight.device)
    states[0, :, :T] = h  # states[k]: depth k's outputs by position (0: the trunk)

    def draft(window: torch.Tensor) -> None:
        """Depths 1..D over the positions ``window`` [B, L]; their guesses at n-1 into tok[n+1..n+D]."""
        at = (rows, n - 1 - window[:, 0])  # where position n-1 sits in each row's window
        for k, module in enumerate(model.mtp, start=1):
            h_k = module(states[k - 1][rows[:, None], window], model.embed(tok[rows[:, None], window + k]),
                         window, caches[k - 1])  # [B, L, C]  # fmt: skip
            if k < D:
                states[k][rows[:, None], window] = h_k
            tok[rows, n + k] = model.head(module.out_norm(h_k[at])).argmax(dim=-1)

    draft(torch.arange(T, device=weight.device).expand(B, T))
    kept = torch.zeros(D, device=weight.device)
    rounds = torch.zeros((), device=weight.device)
    offsets = torch.arange(D + 1, device=weight.device)
    while True:
        active = n - start < max_new - 1  # rows short of max_new known tokens
        if not bool(active.any()):
            break
        positions = n[:, None] + offsets  # [B, D + 1]
        h = main.model.trunk(tok[rows[:, None], positions], positions, main.cache)  # [B, D + 1, C]
        states[0][rows[:, None], positions] = h
        g = model.logits(h).argmax(dim=-1)  # g[:, j] is the token at n + j + 1
        a = (g[:, :D] == tok[rows[:, None], positions[:, 1:]]).long().cumprod(dim=1).sum(dim=1)  # [B]
        kept += ((a[:, None] > torch.arange(D, device=a.device)) & active[:, None]).sum(dim=0)
        rounds += active.sum()
        tok[rows, n + a + 1] = torch.where(active, g[rows, a], tok[rows, n + a + 1])
        n = n + (a + 1) * active  # a finished row stays where it is
        draft((n - W).clamp(min=0)[:, None] + torch.arange(W, device=n.device))

    out = [tok[b, s : s + max_new].tolist() for b, s in enumerate(start.tolist())]
    acceptance = (kept / rounds.clamp(min=1)).tolist()
    return Speculation(out, acceptance, int(rounds))
