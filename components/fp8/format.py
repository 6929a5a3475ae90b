"""DeepSeek-V3's fine-grained FP8 recipe for the projection matrices (``precision=fp8``).

Quantisation (E4M3, scale = max-abs / 448, optionally rounded up to a power of two):
  activations and gradients per 1x128 tile (one row, 128 consecutive values along the GEMM's
  reduction dimension), weights per 128x128 block. An outlier then only coarsens its own tile.

The three GEMMs of ``y = x @ W.T`` (x [M, K] tokens x features, W [N, K]), each with both operands
tiled along its own reduction dimension, since a scale can only be factored out of a dot product
along the dimension it sums over:
  forward  y  [M, N] = x  @ W.T : x per 1x128 along K,   W per 128x128
  dgrad    dx [M, K] = dy @ W   : dy per 1x128 along N,  W per 128x128 (the same blocks, transposed)
  wgrad    dW [N, K] = dy.T @ x : dy.T per 1x128 along M (tokens), x.T per 1x128 along M
Master weights, gradients and optimiser state stay in high precision; outputs are bf16 (fp32 in
emulation). ``dgrad``/``wgrad`` can each be kept in bf16 for ablation.

Paths: ``scaled_mm`` (Hopper: ``torch.nn.functional.scaled_mm`` with BlockWise1x128 /
BlockWise128x128 scales, Triton quantisers) and ``emulated`` (anywhere: the same quantisation,
then dequantise and multiply in fp32), so the numerics are testable on a CPU. Dimensions that are
not multiples of 128 are zero-padded (zeros change no dot product) and the output sliced back.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from components.registry import require

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
ROWS = 16  # the first operand's rows are padded to this: its scales' column-major layout needs aligned rows
GEMM_PRECISIONS = ("fp8", "bf16")
PATHS = ("auto", "scaled_mm", "emulated")


def _scale_of(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Decoding scale of a tile: max-abs maps onto E4M3's largest value. Never below the smallest
    normal float, so an all-zero tile still decodes to zeros and no kernel meets a subnormal scale.
    ``pow2`` rounds it up to a power of two on its bits (exact, unlike ``exp2(ceil(log2))``): add
    a mantissa's worth, keep the exponent."""
    scale = (amax.float() / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    if pow2:
        scale = ((scale.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return scale


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to_tiles(x: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of 128 (and the first to ``rows``' multiple)."""
    r, c = x.shape
    return F.pad(x, (0, -c % TILE, 0, -r % rows)) if (c % TILE or r % rows) else x


def quantize_tiles(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] (C a multiple of 128) -> (E4M3 [R, C], scales [R, C/128]): 1x128 tiles along C."""
    r, c = x.shape
    require(c % TILE == 0, "fp8 tile", c, "a multiple of 128 (pad first)")
    tiles = x.float().reshape(r, c // TILE, TILE)
    scale = _scale_of(tiles.abs().amax(-1), pow2)
    return _cast(tiles, scale[..., None]).view(r, c), scale


def quantize_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] (both multiples of 128) -> (E4M3 [R, C], scales [R/128, C/128]): 128x128 blocks."""
    r, c = w.shape
    require(r % TILE == 0 and c % TILE == 0, "fp8 block", (r, c), "multiples of 128 (pad first)")
    blocks = w.float().view(r // TILE, TILE, c // TILE, TILE)
    scale = _scale_of(blocks.abs().amax(dim=(1, 3)), pow2)
    return _cast(blocks, scale[:, None, :, None]).view(r, c), scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().view(*scale.shape, TILE) * scale[..., None]).view(q.shape)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r, c = scale.shape
    return (q.float().view(r, TILE, c, TILE) * scale[:, None, :, None]).view(q.shape)


# --- GEMMs on quantised operands -----------------------------------------------------------------
# Operands come in "row form": [rows, reduction], scales in their natural row-major shapes.


def _dequantize(q: torch.Tensor, scale: torch.Tensor, blocks: bool) -> torch.Tensor:
    return dequantize_blocks(q, scale) if blocks else dequantize_tiles(q, scale)


def _gemm_emulated(a, sa, b, sb, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return (_dequantize(a, sa, False) @ _dequantize(b, sb, b_blocks).t()).to(out_dtype)


def _gemm_scaled_mm(a, sa, b, sb, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    # cuBLAS (through torch 2.11's checks) wants: 1x128 scales of either operand as [rows, K/128]
    # outer-dim-major (stride (1, rows)); 128x128 scales as [K/128, N/128] with the K blocks padded
    # to a multiple of 4 (the padding is never read: ones); the second operand column-major.
    # Every call costs the host time, so nothing is padded or copied that is already right.
    recipe = F.ScalingType
    sa = sa.t().contiguous().t()
    if b_blocks:
        if sb.shape[1] % 4:
            sb = F.pad(sb, (0, -sb.shape[1] % 4), value=1.0)
        sb, rb = sb.contiguous().t(), recipe.BlockWise128x128
    else:
        sb, rb = sb.t().contiguous().t(), recipe.BlockWise1x128
    return F.scaled_mm(a, b.t(), sa, recipe.BlockWise1x128, sb, rb, output_dtype=out_dtype)


@functools.cache  # asked on every forward of every FP8Linear
def scaled_mm_available(device: torch.device) -> bool:
    """Block-scaled FP8 GEMMs need a CUDA device of compute capability 9.0 (Hopper) or newer."""
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (9, 0)
        and hasattr(F, "scaled_mm")
    )


# --- the linear ----------------------------------------------------------------------------------
# Each operand is quantised once, in every layout its GEMMs need, and kept for the backward:
#   x  -> row tiles along K (forward)      and, for the wgrad, x.T's row tiles along M
#   W  -> 128x128 blocks (forward)         and W.T in the same blocks, contiguous (dgrad)
#   dy -> row tiles along N (dgrad)        and dy.T's row tiles along M (wgrad)
# On the GPU Triton writes x's (and dy's) two layouts in two passes, W.T as a byte transpose of W's
# blocks. Padding (to whole tiles, and to whole 128-token tiles where the tokens are a reduction
# dimension) is zeros, written in those passes.


def quantize_activation(x: torch.Tensor, pow2: bool = False, transposed: bool = False):
    """x [M, K] (rounded to bf16 first, as activations are under autocast; it halves the bytes
    the kernel reads) -> (q [M', K'], s [M', K'/128]) in 1x128 tiles along K, and with ``transposed``
    also (qt [K', M'], st [K', M'/128]), x.T in 1x128 tiles along M (else None, None). K' pads K
    to 128; M' pads M to 128 with ``transposed`` (M is then reduced over), else to ROWS."""
    xp = pad_to_tiles(x.to(torch.bfloat16), TILE if transposed else ROWS)
    q, s = quantize_tiles(xp, pow2)
    return (q, s, *quantize_tiles(xp.t(), pow2)) if transposed else (q, s, None, None)


def quantize_weight(w: torch.Tensor, pow2: bool = False, transposed: bool = True):
    """w [N, K] -> (q [N', K'], s [N'/128, K'/128], qt [K', N']): 128x128 blocks, and with
    ``transposed`` the same blocks in a contiguous W.T (the dgrad's second operand; its scales
    are s.T), else None."""
    q, s = quantize_blocks(pad_to_tiles(w, TILE), pow2)
    return q, s, q.t().contiguous() if transposed else None


# The input most recently quantised by an FP8Linear, and its quantisation (see quantized_input).
_last_input: dict = {}


# --- rounding through E4M3 in place (the routed experts' simulated recipe, components.moe) --------


def fake_quantize_tiles(x: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """x [R, C] through E4M3 with 1x128 tiles along C (C padded to 128, then cut back)."""
    c = x.shape[-1]
    return dequantize_tiles(*quantize_tiles(pad_to_tiles(x), pow2))[:, :c].to(x.dtype)


def fake_quantize_blocks(w: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """w [E, R, C] through E4M3 with 128x128 blocks per expert (experts stacked along the rows,
    each padded to whole blocks, so no block straddles two)."""
    E, r, c = w.shape
    padded = F.pad(w, (0, -c % TILE, 0, -r % TILE))
    R, C = padded.shape[1:]
    flat = dequantize_blocks(*quantize_blocks(padded.reshape(E * R, C), pow2))
    return flat.view(E, R, C)[:, :r, :c].to(w.dtype)
