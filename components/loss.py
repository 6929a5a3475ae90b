"""The output head and its cross-entropy fused, chunk by chunk over the tokens.

The plain path materialises the logits [N, V] and their fp32 copy for the loss: at 16k tokens and
a 32k vocabulary that is 2 GiB per copy, and the softmax's backward holds several. Here each chunk
of tokens forms its logits, reduces them to its share of the loss and, since the gradient of a
mean cross-entropy with respect to the logits is known in the forward ((softmax - onehot) / n),
turns them at once into the chunk's dh and its share of dW. Memory holds one chunk's logits.

Numerics follow the plain path under autocast: logits from a GEMM in the compute dtype, the
softmax in fp32, the logits' gradient rounded to the compute dtype for the two GEMMs of the
backward. Only dW's summation order differs (chunk by chunk, in fp32). Eager, a chunk's softmax
and gradient take several fp32 passes over [chunk, V]; compiled (``trainer.compile``), they fuse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from components.linear import compute_dtype

IGNORE = -100


def chunk_for(vocab_size: int, logits_bytes: int = 2**29) -> int:
    """Tokens per chunk whose fp32 logits take ``logits_bytes`` (512 MiB by default)."""
    return max(1, logits_bytes // (4 * vocab_size))


def cross_entropy_chunk(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, n: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's share of a mean cross-entropy over ``n`` counted tokens: logits [c, V] (any
    float dtype, computed in fp32), targets [c], valid [c] (the tokens counted). Returns the summed
    loss of the counted tokens and, with ``with_grad``, d(mean CE)/d(logits) = (softmax - onehot) / n
    on them, 0 elsewhere, in the logits' dtype. Pointwise and row reductions only, so that compiled
    (``Transformer.loss_chunk_fn``) it is two reads of the logits and one write of the gradient."""
    x = logits.float()
    lse = x.logsumexp(dim=-1)
    t = targets.clamp(min=0)
    loss = ((lse - x.gather(1, t[:, None]).squeeze(1)) * valid).sum()
    if not with_grad:
        return loss, None
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == t[:, None]
    grad = ((x - lse[:, None]).exp() - onehot.float()) * (valid / n)[:, None]
    return loss, grad.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype, with_grad: bool, chunk_fn):
        N = h.shape[0]
        valid = targets != IGNORE
        n = valid.sum().clamp(min=1).float()
        w = weight.to(dtype)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        dh = torch.empty_like(h) if with_grad else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        for s in range(0, N, chunk):
            hc = h[s : s + chunk].to(dtype)
            part, grad = chunk_fn(hc @ w.t(), targets[s : s + chunk], valid[s : s + chunk], n, with_grad)
            loss += part
            if with_grad:
                dh[s : s + chunk] = (grad @ w).to(h.dtype)
                if dw.is_cuda:  # the fp32 sum in the GEMM's epilogue: no cast and add of [V, C]
                    dw = torch.addmm(dw, grad.t(), hc, out_dtype=torch.float32)
                else:  # out_dtype is CUDA-only
                    dw += (grad.t() @ hc).float()
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        return dh * g.to(dh.dtype), (dw * g).to(ctx.weight_dtype), None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    chunk_fn: Callable = cross_entropy_chunk,
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` [N, V] against ``targets`` [N] (-100 ignored),
    ``chunk`` tokens at a time; h [N, C], weight [V, C]. ``chunk_fn``: ``cross_entropy_chunk``
    or a compiled copy of it."""
    dtype = compute_dtype(h)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(h.device.type, enabled=False):  # dtypes are set above, as autocast would
        return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype, with_grad, chunk_fn)
