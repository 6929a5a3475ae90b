"""Triton kernels for the FP8 quantisation of ``components.fp8``: one pass over each tensor
(max-abs, scale, cast, and both layouts where the GEMMs need two), bit for bit the same as the
torch reference there. Imported only on a CUDA device."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from components.fp8.format import E4M3, ROWS, TILE, pad_to_tiles, round_up


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    scale = tl.maximum(amax / 448.0, 1.1754943508222875e-38)  # exactly as the reference
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _cast(x, scale):
    return tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0).to(tl.float8e4nv)


# Memory-bound kernels: their shapes (rows x tiles per program, warps) are the fastest measured on
# an H200 by ``bench/fp8.py --part kernels``; every choice gives the same bits.
ROW_BLOCK, ROW_TILES, ROW_WARPS = 16, 4, 4
COL_BLOCK, COL_WARPS = 32, 4
TRANSPOSE_BLOCK = 64


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, Mp, Kp, stride_m, stride_k,
                          BR: tl.constexpr, TILES: tl.constexpr, POW2: tl.constexpr):  # fmt: skip
    # One program: BR rows x TILES 1x128 tiles of x (zeros past its edge: the padding is written
    # here) -> q [Mp, Kp], scales s [Mp, Kp/128] column-major (scaled_mm's layout).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * TILES * 128 + tl.arange(0, TILES * 128)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k, mask=inside, other=0.0)
    x = tl.reshape(x.to(tl.float32), (BR, TILES, 128))
    scale = _scale(tl.max(tl.abs(x), axis=2), POW2)  # [BR, TILES]
    q = tl.reshape(_cast(x, scale[:, :, None]), (BR, TILES * 128))
    tl.store(q_ptr + rows[:, None] * Kp + cols[None, :], q, mask=(rows[:, None] < Mp) & (cols[None, :] < Kp))
    tiles = tl.program_id(1) * TILES + tl.arange(0, TILES)
    tl.store(
        s_ptr + tiles[None, :] * Mp + rows[:, None],
        scale,
        mask=(rows[:, None] < Mp) & (tiles[None, :] < Kp // 128),
    )


@triton.jit
def _quantize_cols_kernel(x_ptr, qt_ptr, st_ptr, M, K, Mp, Kp, stride_m, stride_k,
                          BC: tl.constexpr, POW2: tl.constexpr):  # fmt: skip
    # One program: 128 rows x BC columns of x -> x.T's 1x128 tiles along M: qt [Kp, Mp], scales
    # st [Kp, Mp/128] column-major. The loaded bf16 values are transposed, never fp32 or float8
    # ones: those transposes misplaced bytes on the device's Triton (uint8 ones are exact).
    rows = tl.program_id(0) * 128 + tl.arange(0, 128)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k, mask=inside, other=0.0)
    xt = tl.trans(x).to(tl.float32)  # [BC, 128]
    scale = _scale(tl.max(tl.abs(xt), axis=1), POW2)
    tl.store(qt_ptr + cols[:, None] * Mp + rows[None, :], _cast(xt, scale[:, None]), mask=cols[:, None] < Kp)
    tl.store(st_ptr + tl.program_id(0) * Kp + cols, scale, mask=cols < Kp)


@triton.jit
def _transpose_bytes_kernel(src, dst, R, C, B: tl.constexpr):
    # W.T from W's FP8 blocks, moved as bytes (torch's generic copy moves single bytes ~4x slower).
    rows = tl.program_id(0) * B + tl.arange(0, B)
    cols = tl.program_id(1) * B + tl.arange(0, B)
    tile = tl.load(src + rows[:, None] * C + cols[None, :])
    tl.store(dst + cols[:, None] * R + rows[None, :], tl.trans(tile))


@triton.jit
def _quantize_blocks_kernel(w_ptr, q_ptr, s_ptr, C, POW2: tl.constexpr):
    # One program: a 128x128 block of a padded, contiguous W -> q and its scale.
    br, bc = tl.program_id(0), tl.program_id(1)
    rows = br * 128 + tl.arange(0, 128)
    cols = bc * 128 + tl.arange(0, 128)
    offs = rows[:, None] * C + cols[None, :]
    w = tl.load(w_ptr + offs).to(tl.float32)
    scale = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    tl.store(q_ptr + offs, _cast(w, scale))
    tl.store(s_ptr + br * (C // 128) + bc, scale)


def quantize_activation_triton(x: torch.Tensor, pow2: bool = False, transposed: bool = False):
    """As ``components.fp8.quantize_activation`` (``x`` may be strided): the row tiles in one pass
    and, with ``transposed``, x.T's tiles in a second (two lean passes measured faster than one
    that writes both)."""
    x = x.to(torch.bfloat16)
    M, K = x.shape
    Mp, Kp = round_up(M, TILE if transposed else ROWS), round_up(K, TILE)
    sizes_and_strides = (M, K, Mp, Kp, x.stride(0), x.stride(1))
    q = torch.empty(Mp, Kp, dtype=E4M3, device=x.device)
    s = torch.empty(Kp // TILE, Mp, device=x.device).t()  # [Mp, Kp/128], column-major
    grid = (triton.cdiv(Mp, ROW_BLOCK), triton.cdiv(Kp, ROW_TILES * TILE))
    _quantize_rows_kernel[grid](x, q, s, *sizes_and_strides, ROW_BLOCK, ROW_TILES, pow2, num_warps=ROW_WARPS)
    if not transposed:
        return q, s, None, None
    qt = torch.empty(Kp, Mp, dtype=E4M3, device=x.device)
    st = torch.empty(Mp // TILE, Kp, device=x.device).t()  # [Kp, Mp/128], column-major
    grid = (Mp // TILE, triton.cdiv(Kp, COL_BLOCK))
    _quantize_cols_kernel[grid](x, qt, st, *sizes_and_strides, COL_BLOCK, pow2, num_warps=COL_WARPS)
    return q, s, qt, st


def transpose_fp8(q: torch.Tensor) -> torch.Tensor:
    """A contiguous q.T of an FP8 matrix whose sides are multiples of 128."""
    R, C = q.shape
    out = torch.empty(C, R, dtype=q.dtype, device=q.device)
    grid = (R // TRANSPOSE_BLOCK, C // TRANSPOSE_BLOCK)
    _transpose_bytes_kernel[grid](q.view(torch.uint8), out.view(torch.uint8), R, C, TRANSPOSE_BLOCK)
    return out


def quantize_weight_triton(w: torch.Tensor, pow2: bool = False, transposed: bool = True):
    """As ``components.fp8.quantize_weight``: the blocks, then W.T as a byte transpose of them. A
    transpose fused into the block kernel, of the fp32 values or of the quantised bytes, wrote
    wrong bytes on the device's Triton (``bench/fp8.py --part check`` caught both)."""
    w = pad_to_tiles(w, TILE).contiguous()
    R, C = w.shape
    q = torch.empty(R, C, dtype=E4M3, device=w.device)
    s = torch.empty(R // TILE, C // TILE, device=w.device)
    _quantize_blocks_kernel[(R // TILE, C // TILE)](w, q, s, C, pow2, num_warps=8)
    return q, s, transpose_fp8(q) if transposed else None


__all__ = ["quantize_activation_triton", "quantize_weight_triton", "transpose_fp8"]
