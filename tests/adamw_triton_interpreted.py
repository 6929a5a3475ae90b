"""``research.training.adamw_triton`` run by Triton's CPU interpreter (``TRITON_INTERPRET=1`` must be set
before Triton is imported, so ``tests/test_optim.py`` runs this file in its own process): the
kernel against the torch reference, over a tensor that ends inside a block, for several steps.

The master and moments must agree to rounding. The interpreter casts fp32 to bf16 by truncation
(a GPU rounds to nearest even, as torch does: ``bench/throughput.py``'s first losses show it), so
the bf16 weight is checked to within one bf16 step of its master."""

import torch

from research.training.adamw_step import StepScalars, adamw_master_update_reference
from research.training.adamw_triton import BLOCK, adamw_master_update


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n = 2 * BLOCK + 77  # the last program's block is mostly outside the tensor
    master = torch.randn(n, generator=g)
    runs = []
    # The reference in float64: torch's fp32 division by a scalar on a CPU is not always correctly
    # rounded (seen 2.6e-4 off, in some processes and not others).
    for update, dtype in (
        (adamw_master_update, torch.float32),
        (adamw_master_update_reference, torch.float64),
    ):
        # each tensor the head of a longer buffer, whose tail the last block must leave alone
        buffers = [torch.full((n + BLOCK,), 7.0, dtype=d) for d in (torch.bfloat16, dtype, dtype, dtype)]
        p, w, m, v = (b[:n] for b in buffers)
        p.copy_(master)
        w.copy_(master)
        m.zero_()
        v.zero_()
        for step in range(1, 4):
            grad = torch.randn(n, generator=torch.Generator().manual_seed(step)).bfloat16()
            scale = torch.tensor(0.5 + step / 10, dtype=dtype)  # a clipping coefficient
            group = {"lr": 1e-2 / step, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
            update(p, w, grad, m, v, scale, StepScalars.of(group, step))
        assert all(torch.all(b[n:] == 7.0) for b in buffers)
        runs.append((p, w, m, v))
    (p, w, m, v), (_, w_ref, m_ref, v_ref) = runs
    for got, want in ((w, w_ref), (m, m_ref), (v, v_ref)):
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-7)
    assert torch.all((p.float() - w).abs() <= w.abs() * 2**-7)  # one bf16 step (8 mantissa bits)
    print("ok")


if __name__ == "__main__":
    main()
