"""Causal self-attention: MHA, GQA and DeepSeek's multi-head latent attention (MLA).

Every variant takes ``x`` [B, T, C] and integer ``positions`` [T], and returns [B, T, C]. Passing a
``cache`` (from ``new_cache``: tensors preallocated for every position, so a decode step has static
shapes and can be replayed as a CUDA graph) switches to incremental decoding: ``positions`` are then
per row, [B, T], the layer writes what it caches for the new tokens at those positions and attends,
row by row, over every cached position up to each query's own. Rows of one batch may so sit at
different lengths (prompts of different lengths, speculative tokens accepted per row). Each variant
reports the bytes it caches per token, the number MLA exists to shrink.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from components.linear import LinearFactory, project
from components.registry import Registry, require
from components.rope import RotaryEmbedding, apply_rope

ATTENTION = Registry("attention")


KVCache = dict[str, torch.Tensor]  # name -> [B, S, ...]: one layer's cache, every position allocated


def _write(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Store ``new`` [B, T, ...] at ``positions`` [B, T] of ``cache`` [B, S, ...]; return the cache."""
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None]  # [B, 1]
    cache[rows, positions] = new.to(cache.dtype)
    return cache


def _decode_mask(positions: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Causal mask [B, 1, T, S] for queries at ``positions`` [B, T] over keys at 0..S-1: positions
    past a row's own hold stale or unwritten values and are never read."""
    keys = torch.arange(n_keys, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Masked attention of q [B, H, T, D] over k [B, Hkv, S, D], v [B, Hkv, S, Dv] -> [B, H, T, Dv],
    mask [B, 1, T, S]. The G = H / Hkv query heads of each key head are folded into the query dim,
    so no kernel copies the keys once per query head (``enable_gqa`` does, where it cannot fuse
    the mask): a decode step reads the cache once. Query head h uses key head h // G."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    q = q.reshape(B, Hkv, G * T, D)  # [B, Hkv, G*T, D]: head-major, then time
    mask = mask[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, G*T, Dv]
    return y.reshape(B, H, T, v.shape[-1])


def _per_head(t: torch.Tensor) -> torch.Tensor:
    """rope's cos/sin for tensors with a head dim: [T, d] stays (it broadcasts), [B, T, d] -> [B, 1, T, d]."""
    return t if t.dim() == 2 else t[:, None]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    kernel: SDPBackend | None = None,
) -> torch.Tensor:
    """Causal SDPA: q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] -> [B, H, T, Dv], on
    ``kernel`` (None: SDPA picks; on a Hopper GPU it picks cuDNN, which takes MLA's narrower v as
    it is). The flash kernel needs one head dim, so for it a narrower v is zero-padded to D and the
    padded output columns, zeros, are dropped."""
    Dv = v.shape[-1]
    if Dv < q.shape[-1] and kernel == SDPBackend.FLASH_ATTENTION:
        v = F.pad(v, (0, q.shape[-1] - Dv))
    with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    return y[..., :Dv]


class Attention(nn.Module):
    """What every attention variant is to the rest of the platform: the model reads its head shape
    (``n_heads``, ``qk_head_dim``, ``v_head_dim``) for FLOPs and its KV-cache size per token; the
    speed converters set ``sdpa_kernel`` (``trainer.attention_kernel``) and ``stacked`` (the
    projections of one input as one GEMM, ``components.linear.project``). A new variant subclasses
    this and registers a builder with ``ATTENTION``; nothing else needs to know it exists."""

    def __init__(self, n_heads: int, qk_head_dim: int, v_head_dim: int):
        super().__init__()
        self.n_heads, self.qk_head_dim, self.v_head_dim = n_heads, qk_head_dim, v_head_dim
        self.sdpa_kernel: SDPBackend | None = None  # the training path's kernel
        self.stacked = False

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """What decoding caches per token: name -> shape of one token's entry."""
        raise NotImplementedError

    def kv_cache_values_per_token(self) -> int:
        return sum(math.prod(shape) for shape in self.cache_shapes().values())

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return self.kv_cache_values_per_token() * bytes_per_value

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """Zeros for ``batch`` rows of ``max_len`` positions each: the decoding cache, allocated once."""
        return {name: torch.zeros(batch, max_len, *shape, dtype=dtype, device=device)
                for name, shape in self.cache_shapes().items()}  # fmt: skip

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x [B, T, C] at ``positions`` [T] -> [B, T, C]; with ``cache``, positions [B, T] per row."""
        raise NotImplementedError


class GroupedQueryAttention(Attention):
    """MHA when ``n_kv_heads == n_heads``, GQA (shared key/value heads) when fewer."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope_theta: float,
        linear: LinearFactory,
    ):
        super().__init__(n_heads, head_dim, head_dim)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.wq = linear(d_model, n_heads * head_dim)
        self.wk = linear(d_model, n_kv_heads * head_dim)
        self.wv = linear(d_model, n_kv_heads * head_dim)
        self.wo = linear(n_heads * head_dim, d_model)
        self.rope = RotaryEmbedding(head_dim, rope_theta)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = project(x, (self.wq, self.wk, self.wv), self.stacked)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        cos, sin = map(_per_head, self.rope(positions))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = causal_attention(q, k, v, kernel=self.sdpa_kernel)
        else:  # the cache is [B, S, Hkv, D]: time second, so that rows write at their own positions
            k = _write(cache["k"], k.transpose(1, 2), positions).transpose(1, 2)  # [B, Hkv, S, D]
            v = _write(cache["v"], v.transpose(1, 2), positions).transpose(1, 2)
            y = grouped_attention(q, k.type_as(q), v.type_as(q), _decode_mask(positions, k.shape[2]))
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class MultiHeadLatentAttention(Attention):
    """MLA (DeepSeek-V2/V3): keys and values come from a shared low-rank latent.

    Training path: expand the latent into per-head keys/values and run SDPA. Decoding path: cache
    only the normalised latent ``c_kv`` and the one rope key ``k_pe`` shared by all heads, and
    absorb the key up-projection into the query and the value up-projection into the output, so
    attention runs directly against the latent (an MQA over ``kv_lora_rank + rope`` dims).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        q_lora_rank: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rope_theta: float,
        norm_eps: float,
        linear: LinearFactory,
    ):
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        super().__init__(n_heads, qk_dim, v_head_dim)
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        if q_lora_rank > 0:
            self.wq_a = linear(d_model, q_lora_rank)
            self.q_norm = nn.RMSNorm(q_lora_rank, eps=norm_eps)
            self.wq_b = linear(q_lora_rank, n_heads * qk_dim)
        else:
            self.wq = linear(d_model, n_heads * qk_dim)
        self.wkv_a = linear(d_model, kv_lora_rank + qk_rope_head_dim)
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=norm_eps)
        self.wkv_b = linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim))
        self.wo = linear(n_heads * v_head_dim, d_model)
        self.rope = RotaryEmbedding(qk_rope_head_dim, rope_theta)
        self.scale = qk_dim**-0.5  # 1/sqrt(nope + rope): the full query-key dot product

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        # The normalised latent and the rope key side by side: one tensor is the MQA key as it is.
        return {"latent": (self.kv_lora_rank + self.rope_dim,)}

    def _queries(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q: x's query projection [B, T, q_lora_rank], or the queries [B, T, H * (nope + rope)]
        without a query latent."""
        B, T, _ = q.shape
        if self.q_lora_rank > 0:
            q = self.wq_b(self.q_norm(q))
        q = q.view(B, T, self.n_heads, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, _per_head(cos), _per_head(sin))  # [B, H, T, nope], [B, H, T, rope]

    def _latents(self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv), apply_rope(k_pe, cos, sin)  # [B, T, L], [B, T, rope]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        cos, sin = self.rope(positions)
        wq = self.wq_a if self.q_lora_rank > 0 else self.wq
        q, kv = project(x, (wq, self.wkv_a), self.stacked)
        q_nope, q_pe = self._queries(q, cos, sin)
        c_kv, k_pe = self._latents(kv, cos, sin)
        if cache is not None:
            y = self._attend_latent(q_nope, q_pe, torch.cat((c_kv, k_pe), dim=-1), positions, cache)
        else:
            kv = self.wkv_b(c_kv).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            q = torch.cat((q_nope, q_pe), dim=-1)
            k = torch.cat((k_nope, k_pe[:, None].expand(B, H, T, self.rope_dim)), dim=-1)
            y = causal_attention(q, k, v, self.scale, self.sdpa_kernel)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _attend_latent(self, q_nope, q_pe, latent, positions, cache: KVCache) -> torch.Tensor:
        """Absorbed attention over the cached latent [B, T, L + rope]; per-head values [B, H, T, v]."""
        w_kv_b = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv_b.split([self.nope, self.v_dim], dim=1)  # [H, nope, L], [H, v, L]
        k = _write(cache["latent"], latent, positions).type_as(q_nope)[:, None]  # [B, 1, S, L + rope]
        q = torch.cat((torch.einsum("bhtn,hnl->bhtl", q_nope, w_uk.type_as(q_nope)), q_pe), dim=-1)
        mask = _decode_mask(positions, k.shape[2])
        o = grouped_attention(q, k, k[..., : self.kv_lora_rank], mask, self.scale)  # [B, H, T, L]
        return torch.einsum("bhtl,hvl->bhtv", o, w_uv.type_as(o))


def _check_heads(n_heads: int, d_model: int, head_dim: int | None) -> int:
    require(n_heads >= 1, "attention.n_heads", n_heads, "a positive integer")
    if head_dim is None:
        require(
            d_model % n_heads == 0,
            "attention.n_heads",
            n_heads,
            f"a divisor of d_model={d_model} (or set attention.head_dim)",
        )
        head_dim = d_model // n_heads
    require(
        head_dim > 0 and head_dim % 2 == 0,
        "attention.head_dim",
        head_dim,
        "a positive even number (RoPE rotates pairs)",
    )
    return head_dim


@ATTENTION.register("mha")
def build_mha(
    d_model: int,
    linear: LinearFactory,
    n_heads: int = 8,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
) -> GroupedQueryAttention:
    return build_gqa(d_model, linear, n_heads, n_heads, head_dim, rope_theta)  # MHA = GQA with all kv heads


@ATTENTION.register("gqa")
def build_gqa(
    d_model: int,
    linear: LinearFactory,
    n_heads: int = 8,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
) -> GroupedQueryAttention:
    head_dim = _check_heads(n_heads, d_model, head_dim)
    require(
        n_kv_heads >= 1 and n_heads % n_kv_heads == 0,
        "attention.n_kv_heads",
        n_kv_heads,
        f"a positive divisor of attention.n_heads={n_heads}",
    )
    return GroupedQueryAttention(d_model, n_heads, n_kv_heads, head_dim, rope_theta, linear)


@ATTENTION.register("mla")
def build_mla(
    d_model: int,
    linear: LinearFactory,
    n_heads: int = 8,
    q_lora_rank: int = 0,
    kv_lora_rank: int = 128,
    qk_nope_head_dim: int = 32,
    qk_rope_head_dim: int = 16,
    v_head_dim: int = 32,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-6,
) -> MultiHeadLatentAttention:
    require(n_heads >= 1, "attention.n_heads", n_heads, "a positive integer")
    require(
        q_lora_rank >= 0, "attention.q_lora_rank", q_lora_rank, "0 (no query compression) or a positive rank"
    )
    for key, value in (
        ("kv_lora_rank", kv_lora_rank),
        ("qk_nope_head_dim", qk_nope_head_dim),
        ("v_head_dim", v_head_dim),
    ):
        require(value >= 1, f"attention.{key}", value, "a positive integer")
    require(
        qk_rope_head_dim > 0 and qk_rope_head_dim % 2 == 0,
        "attention.qk_rope_head_dim",
        qk_rope_head_dim,
        "a positive even number (RoPE rotates pairs)",
    )
    return MultiHeadLatentAttention(
        d_model,
        n_heads,
        q_lora_rank,
        kv_lora_rank,
        qk_nope_head_dim,
        qk_rope_head_dim,
        v_head_dim,
        rope_theta,
        norm_eps,
        linear,
    )
