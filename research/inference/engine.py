"""Batched decoding over a preallocated cache: prefill prompts of different lengths, then one token
per row per step, sampled greedy, by temperature, or from the top-p nucleus.

Rows are right-padded and each keeps its own length: a row's prompt tokens sit at positions
0..len-1 and its next token is written at position len, over whatever padding was there. The
cache and every step's tensors have static shapes, so with ``compile=True`` one decode step is
compiled once and replayed as a CUDA graph (``mode="reduce-overhead"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.attention import KVCache
from research.errors import DecodeError
from research.model.transformer import Transformer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # the smallest set of tokens whose probabilities reach top_p
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise DecodeError(f"temperature={self.temperature}: expected 0 (greedy) or a positive number")
        if not 0 < self.top_p <= 1:
            raise DecodeError(f"top_p={self.top_p}: expected a number in (0, 1]")


GREEDY = Sampling()


def sample(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each
        sorted_p = sorted_p.masked_fill(before >= sampling.top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Decoder:
    """One model's decoding state for ``batch`` rows of at most ``max_len`` tokens each."""

    def __init__(self, model: Transformer, batch: int, max_len: int, compile: bool = False):
        self.model, self.batch, self.max_len = model.eval(), batch, max_len
        model.reserve_positions(max_len)
        self.cache: list[KVCache] = model.new_cache(batch, max_len)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=model.embed.weight.device)
        self._step = (
            torch.compile(self._decode, mode="reduce-overhead", fullgraph=True) if compile else self._decode
        )

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def cache_bytes(self) -> int:
        """Bytes the cache holds, as allocated."""
        return sum(t.numel() * t.element_size() for layer in self.cache for t in layer.values())

    def _decode(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.trunk(idx, positions, self.cache)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts (one per row, of any lengths) through the model; the logits [B, V] of
        each row's next token."""
        return self.prefill_states(prompts)[0]

    @torch.no_grad()
    def prefill_states(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(next-token logits [B, V], trunk states [B, T, C], the right-padded prompts [B, T]): the
        states and tokens are what speculative drafting starts from."""
        if len(prompts) != self.batch:
            raise DecodeError(f"{len(prompts)} prompts for a decoder of batch {self.batch}")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise DecodeError("an empty prompt: each needs at least one token")
        T = max(lengths)
        if self.max_len <= T:
            raise DecodeError(f"a prompt of {T} tokens leaves no room to generate within the decoder's "
                              f"{self.max_len} positions")  # fmt: skip
        idx = torch.zeros(self.batch, T, dtype=torch.long, device=self.device)
        for row, p in enumerate(prompts):
            idx[row, : len(p)] = torch.as_tensor(p, device=self.device)
        self.lengths = torch.as_tensor(lengths, device=self.device)
        positions = torch.arange(T, device=self.device).expand(self.batch, T)
        h = self.model.trunk(idx, positions, self.cache)  # [B, T, C]
        last = h[torch.arange(self.batch, device=self.device), self.lengths - 1]  # [B, C]
        return self.model.logits(last), h, idx

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [B] (each at its row's length); the logits [B, V] of the token after."""
        h = self._step(tokens[:, None], self.lengths[:, None])  # [B, 1, C]
        self.lengths = self.lengths + 1
        return self.model.logits(h[:, 0])


def check_prompts(prompts: list[list[int]], context: int | None) -> None:
    longest = max(map(len, prompts), default=0)
    if context is not None and longest > context:
        raise DecodeError(f"a prompt of {longest} tokens is longer than the model's context "
                          f"({context} tokens, data.seq_len of its run)")  # fmt: skip


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new: int,
    sampling: Sampling = GREEDY,
    compile: bool = False,
    context: int | None = None,
) -> list[list[int]]:
    """``max_new`` tokens after each prompt; ``context``, the length the model was trained on,
    bounds the prompts."""
    check_prompts(prompts, context)
    decoder = Decoder(model, len(prompts), max(map(len, prompts)) + max_new, compile)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(decoder.device).manual_seed(sampling.seed)
    logits = decoder.prefill(prompts)
    out = []
    for i in range(max_new):
        tokens = sample(logits, sampling, generator)
        out.append(tokens)
        if i + 1 < max_new:
            logits = decoder.step(tokens)
    return torch.stack(out, dim=1).tolist()
