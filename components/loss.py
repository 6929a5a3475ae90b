"""The output head and its cross-entropy fused, chunk by chunk over the tokens.

The plain path materialises the logits [N, V] and their fp32 copy for the loss: at 16k tokens and
a 32k vocabulary that is 2 GiB per copy, and the softmax's backward holds several. Here each chunk
of tokens forms its logits, reduces them to its share of the loss and, since the gradient of a
mean cross-entropy with respect to the logits is known in the forward ((softmax - onehot) / n),
turns them at once into the chunk's dh and its share of dW. Memory holds one chunk's logits.

Numerics follow the plain path under autocast: logits from a GEMM in the compute dtype, the
softmax in fp32, the logits' gradient rounded to the compute dtype for the two GEMMs of the
backward. Only dW's summation order differs (chunk by chunk, in fp32).
"""

from __future__ import annotations

import torch

from components.linear import compute_dtype

IGNORE = -100


def chunk_for(vocab_size: int, logits_bytes: int = 2**29) -> int:
    """Tokens per chunk whose fp32 logits take ``logits_bytes`` (512 MiB by default)."""
    return max(1, logits_bytes // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype, with_grad: bool):
        N = h.shape[0]
        valid = targets != IGNORE
        n = valid.sum().clamp(min=1).float()
        w = weight.to(dtype)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        dh = torch.empty_like(h) if with_grad else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        for s in range(0, N, chunk):
            hc, tc, vc = h[s : s + chunk].to(dtype), targets[s : s + chunk], valid[s : s + chunk]
            logits = (hc @ w.t()).float()  # [n, V]
            lse = logits.logsumexp(dim=-1)
            picked = logits.gather(1, tc.clamp(min=0)[:, None]).squeeze(1)
            loss += ((lse - picked) * vc).sum()
            if with_grad:  # d(mean CE)/d logits = (softmax - onehot) / n on the counted tokens
                grad = (logits - lse[:, None]).exp_()
                grad.scatter_add_(1, tc.clamp(min=0)[:, None], -torch.ones_like(lse)[:, None])
                grad = (grad * (vc[:, None] / n)).to(dtype)
                dh[s : s + chunk] = (grad @ w).to(h.dtype)
                dw += (grad.t() @ hc).float()
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        return dh * g.to(dh.dtype), (dw * g).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` [N, V] against ``targets`` [N] (-100 ignored),
    ``chunk`` tokens at a time; h [N, C], weight [V, C]."""
    dtype = compute_dtype(h)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(h.device.type, enabled=False):  # dtypes are set above, as autocast would
        return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype, with_grad)
