"""Triton kernels for the FP8 quantisation of ``components.fp8``: one pass over each tensor
(max-abs, scale, cast, and both layouts where the GEMMs need two), bit for bit the same as the
torch reference there. Imported only on a CUDA device."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from components.fp8 import E4M3, ROWS, TILE, pad_to_tiles, round_up


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


# Memory-bound: the only knob that matters is how many warps share a tile (their numerics are equal).
_WARPS = [triton.Config({}, num_warps=w) for w in (4, 8, 16)]


@triton.autotune(_WARPS, key=["Mp", "Kp", "ROWS", "TRANSPOSED"])
@triton.jit
def _quantize_activation_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, Mp, Kp, stride_m, stride_k,
                                ROWS: tl.constexpr, TRANSPOSED: tl.constexpr,
                                POW2: tl.constexpr):  # fmt: skip
    # One program: ROWS rows x 128 columns of x (zeros past its edge: the padding is written here).
    # Row tiles -> q [Mp, Kp] with scales s [Mp, Kp/128] column-major (scaled_mm's layout); with
    # TRANSPOSED (ROWS is then 128) the same block's column tiles -> qt = x.T [Kp, Mp], scales st
    # [Kp, Mp/128] column-major. Reading x once for both is the point: it is the largest tensor.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k, mask=inside, other=0.0)
    x32 = x.to(tl.float32)
    scale = _scale(tl.max(tl.abs(x32), axis=1), POW2)
    tl.store(q_ptr + rows[:, None] * Kp + cols[None, :], _cast(x32, scale[:, None]))
    tl.store(s_ptr + kb * Mp + rows, scale)
    if TRANSPOSED:  # transpose the loaded values (never fp8: Triton's 8-bit transposes misplace bytes)
        xt = tl.trans(x).to(tl.float32)  # [128 cols, ROWS rows]
        scale_t = _scale(tl.max(tl.abs(xt), axis=1), POW2)
        tl.store(qt_ptr + cols[:, None] * Mp + rows[None, :], _cast(xt, scale_t[:, None]))
        tl.store(st_ptr + tl.program_id(0) * Kp + cols, scale_t)


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
    """As ``components.fp8.quantize_activation`` (``x`` may be strided), in one pass."""
    x = x.to(torch.bfloat16)
    M, K = x.shape
    Mp, Kp = round_up(M, TILE if transposed else ROWS), round_up(K, TILE)
    q = torch.empty(Mp, Kp, dtype=E4M3, device=x.device)
    s = torch.empty(Kp // TILE, Mp, device=x.device).t()  # [Mp, Kp/128], column-major
    qt = st = None
    if transposed:
        qt = torch.empty(Kp, Mp, dtype=E4M3, device=x.device)
        st = torch.empty(Mp // TILE, Kp, device=x.device).t()  # [Kp, Mp/128], column-major
    rows = TILE if transposed else ROWS
    _quantize_activation_kernel[(Mp // rows, Kp // TILE)](
        x, q, s, qt if transposed else q, st if transposed else s, M, K, Mp, Kp, x.stride(0), x.stride(1),
        rows, transposed, pow2,
    )  # fmt: skip
    return q, s, qt, st


def quantize_weight_triton(w: torch.Tensor, pow2: bool = False, transposed: bool = True):
    """As ``components.fp8.quantize_weight``. The weights are small next to the activations: W.T is
    a plain copy of the quantised blocks (a transpose fused into this kernel miscompiled for fp32
    weights on the Triton we ship with, so it stays out)."""
    w = pad_to_tiles(w, TILE).contiguous()
    R, C = w.shape
    q = torch.empty(R, C, dtype=E4M3, device=w.device)
    s = torch.empty(R // TILE, C // TILE, device=w.device)
    _quantize_blocks_kernel[(R // TILE, C // TILE)](w, q, s, C, pow2, num_warps=8)
    return q, s, q.t().contiguous() if transposed else None


__all__ = ["quantize_activation_triton", "quantize_weight_triton"]
