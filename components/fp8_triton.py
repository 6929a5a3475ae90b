"""Triton kernels for the FP8 quantisation of ``components.fp8``: one pass over the data per tile
or block (max-abs, scale, cast), bit for bit the same as the torch reference there. Imported only
on a CUDA device."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from components.fp8 import E4M3, E4M3_MAX, TILE


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    scale = tl.maximum(amax, 1.1754943508222875e-38) / 448.0  # / 448 exactly as the reference
    if POW2:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    return scale


@triton.jit
def _quantize_tiles_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_r, stride_c, ROWS: tl.constexpr,
                           POW2: tl.constexpr):  # fmt: skip
    # One program: ROWS rows x one 128-wide tile; x may be strided (a transpose is read in place).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tile = tl.program_id(1)
    cols = tile * 128 + tl.arange(0, 128)
    mask = rows[:, None] < R
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(
        tl.float32
    )
    scale = _scale(tl.max(tl.abs(x), axis=1), POW2)
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * (C // 128) + tile, scale, mask=rows < R)


@triton.jit
def _quantize_blocks_kernel(w_ptr, q_ptr, s_ptr, C, POW2: tl.constexpr):
    br, bc = tl.program_id(0), tl.program_id(1)
    rows = br * 128 + tl.arange(0, 128)
    cols = bc * 128 + tl.arange(0, 128)
    offs = rows[:, None] * C + cols[None, :]
    w = tl.load(w_ptr + offs).to(tl.float32)
    scale = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    q = tl.clamp(tl.math.div_rn(w, scale), -448.0, 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + offs, q)
    tl.store(s_ptr + br * (C // 128) + bc, scale)


def quantize_tiles_triton(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``components.fp8.quantize_tiles``; ``x`` may be a strided view (e.g. a transpose)."""
    R, C = x.shape
    assert C % TILE == 0, C
    q = torch.empty(R, C, dtype=E4M3, device=x.device)
    s = torch.empty(R, C // TILE, dtype=torch.float32, device=x.device)
    rows = 128 if x.stride(0) == 1 else 16  # a transpose: read 128 contiguous rows per column
    _quantize_tiles_kernel[(triton.cdiv(R, rows), C // TILE)](x, q, s, R, C, x.stride(0), x.stride(1), rows,
                                                              pow2)  # fmt: skip
    return q, s


def quantize_blocks_triton(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    R, C = w.shape
    assert R % TILE == 0 and C % TILE == 0, (R, C)
    w = w.contiguous()
    q = torch.empty(R, C, dtype=E4M3, device=w.device)
    s = torch.empty(R // TILE, C // TILE, dtype=torch.float32, device=w.device)
    _quantize_blocks_kernel[(R // TILE, C // TILE)](w, q, s, C, pow2)
    return q, s


__all__ = ["E4M3_MAX", "quantize_blocks_triton", "quantize_tiles_triton"]
