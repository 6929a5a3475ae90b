"""MoE dispatch on the GPU: grouped GEMM vs the padded-bmm fallback vs a per-expert loop.

    python -m bench.moe_dispatch        (from the repo root on a CUDA machine; needs only torch)

Checks that both vectorised paths match the loop (forward and input gradient) under bf16 autocast,
then prints forward+backward time per layer for each path.
"""

from __future__ import annotations

import torch

from bench.timing import time_ms
from components.balance import BalancePolicy
from components.linear import make_linear
from components.moe import build_moe, moe_reference


def main() -> None:
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    C, E, K, H, tokens = 1024, 64, 6, 256, 16384
    print(f"d_model {C}, {E} experts top-{K}, expert dim {H}, {tokens} tokens, bf16 autocast, fwd+bwd")
    print(f"{'path':<12}{'max |diff| vs loop':>20}{'grad diff':>12}{'ms':>10}")
    torch.manual_seed(0)
    x = torch.randn(1, tokens, C, device=dev)
    results = {}
    for backend in ("grouped_mm", "padded", "loop"):
        torch.manual_seed(0)
        moe = build_moe(
            C,
            make_linear,
            BalancePolicy(),
            n_routed_experts=E,
            top_k=K,
            expert_dim=H,
            n_shared_experts=1,
            gemm_backend="auto" if backend == "loop" else backend,
        ).to(dev)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        xi = x.clone().requires_grad_()

        def step(moe=moe, xi=xi, backend=backend):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = moe_reference(moe, xi) if backend == "loop" else moe(xi)
            y.float().square().mean().backward()
            return y

        y = step()
        results[backend] = (y.detach().float(), xi.grad.detach().clone())
        xi.grad = None
        results[backend] += (time_ms(step),)
    ref_y, ref_g, _ = results["loop"]
    for backend, (y, g, ms) in results.items():
        dy = (y - ref_y).abs().max().item()
        dg = ((g - ref_g).abs().max() / ref_g.abs().max()).item()
        print(f"{backend:<12}{dy:>20.3e}{dg:>12.3e}{ms:>10.2f}")


if __name__ == "__main__":
    main()
