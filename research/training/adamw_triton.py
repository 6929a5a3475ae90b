"""The Triton kernel of ``research.training.optim.MasterAdamW``: one pass over a bf16 weight's gradient, its
fp32 master and moments, writing the updated master, moments and bf16 weight. Imported only on a
CUDA device (and by the interpreted test)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from research.training.adamw_step import StepScalars

BLOCK = 1024  # elements per program: at the H200's memory bandwidth (2048 and up measured slower)


@triton.jit
def _adamw_master_kernel(p_ptr, w_ptr, g_ptr, m_ptr, v_ptr, scale_ptr, n, decay, beta1, beta2, eps, step_size,
                         bc2_sqrt, SCALED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside).to(tl.float32)
    if SCALED:
        g = g * tl.load(scale_ptr)
    w = tl.load(w_ptr + offs, mask=inside) * decay
    m = tl.load(m_ptr + offs, mask=inside)
    v = tl.load(v_ptr + offs, mask=inside)
    m = m + (1 - beta1) * (g - m)  # torch's lerp for a weight under 0.5
    v = v * beta2 + (1 - beta2) * g * g
    w = w - step_size * tl.math.div_rn(m, tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    tl.store(w_ptr + offs, w, mask=inside)
    tl.store(m_ptr + offs, m, mask=inside)
    tl.store(v_ptr + offs, v, mask=inside)
    tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside)


def adamw_master_update(
    p: torch.Tensor,
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_scale: torch.Tensor | None,
    s: StepScalars,
) -> None:
    """``research.training.optim.adamw_master_update_reference`` in one kernel; every tensor contiguous,
    ``grad_scale`` an fp32 scalar on the same device."""
    n = p.numel()
    scale = grad if grad_scale is None else grad_scale  # any pointer, unread when not SCALED
    _adamw_master_kernel[(triton.cdiv(n, BLOCK),)](
        p, master, grad, exp_avg, exp_avg_sq, scale, n,
        s.decay, s.beta1, s.beta2, s.eps, s.step_size, s.bc2_sqrt,
        SCALED=grad_scale is not None, BLOCK=BLOCK,
    )  # fmt: skip
