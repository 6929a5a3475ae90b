"""The Triton quantisers run by Triton's CPU interpreter (``TRITON_INTERPRET=1`` must be set before
Triton is imported, so ``tests/test_fp8.py`` runs this file in its own process). It checks what the
kernels decide for themselves: which tile each value lands in, the layouts (x.T, column-major
scales), the zero padding, strided inputs, W.T's bytes, and the power-of-two scales.

Scales must equal the torch reference bit for bit. Values may differ by one binade (8 codes): the
interpreter's float-to-E4M3 cast drops the carry when a mantissa rounds up (1.96 becomes 1.0, not
2.0); on a GPU they are bit for bit the same, which ``bench/fp8.py --part check`` shows. A value
put in the wrong place would be off by far more."""

import sys

import torch

from components.fp8.format import quantize_activation, quantize_weight
from components.fp8.triton import quantize_activation_triton, quantize_weight_triton

ONE_BINADE = 8  # E4M3 codes per power of two (3 mantissa bits)


def _ordered(q: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes as integers ordered like the values they encode (sign-magnitude to signed)."""
    b = q.view(torch.uint8).to(torch.int16)
    return torch.where(b >= 128, 128 - b, b)


def _agree(got, want) -> list[str]:
    problems = []
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        if (a is None) != (b is None):
            problems.append(f"output {k}: {a is None=} {b is None=}")
        elif a is None:
            continue
        elif a.shape != b.shape:
            problems.append(f"output {k}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        elif a.dtype == torch.float8_e4m3fn:
            if (_ordered(a) - _ordered(b)).abs().max() > ONE_BINADE:
                problems.append(f"output {k}: values misplaced")
        elif not torch.equal(a, b):
            problems.append(f"output {k}: scales differ")
    return problems


def main() -> int:
    torch.manual_seed(0)
    problems = []
    for M, K in ((300, 200), (256, 384), (17, 640)):  # ragged, whole, fewer rows than a block
        x = (torch.randn(M, K) * torch.logspace(-2, 2, K)).to(torch.bfloat16)
        for pow2 in (False, True):
            for transposed in (False, True):
                for name, t in (("contiguous", x), ("strided", x.t().contiguous().t())):
                    got = quantize_activation_triton(t, pow2, transposed)
                    want = quantize_activation(x, pow2, transposed)
                    problems += [f"x {M}x{K} {name} {pow2=} {transposed=}: {p}" for p in _agree(got, want)]
    for R, C in ((384, 256), (200, 300)):
        w = torch.randn(R, C) * 0.02
        for pow2 in (False, True):
            got, want = quantize_weight_triton(w, pow2), quantize_weight(w, pow2)
            problems += [f"W {R}x{C} {pow2=}: {p}" for p in _agree(got, want)]
            if not torch.equal(got[2].view(torch.uint8), got[0].view(torch.uint8).t()):
                problems.append(f"W {R}x{C} {pow2=}: W.T is not the blocks' bytes transposed")
    print("\n".join(problems) or "ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
