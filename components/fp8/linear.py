"""``FP8Linear``: a projection whose three GEMMs run on FP8 operands (``components.fp8.format``),
on Hopper through ``scaled_mm`` with the Triton quantisers, elsewhere emulated."""

from __future__ import annotations

import torch
from torch import nn

from components.fp8.format import (
    GEMM_PRECISIONS,
    PATHS,
    _gemm_emulated,
    _gemm_scaled_mm,
    _last_input,
    quantize_activation,
    quantize_weight,
    scaled_mm_available,
)
from components.registry import require


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, linear: FP8Linear, x_quantized: tuple):
        M, N = x.shape[0], weight.shape[0]
        fp8_dgrad = linear.dgrad == "fp8" and x.requires_grad
        xq, xs, xtq, xts = x_quantized
        fp8_wgrad = xtq is not None
        wq, ws, wtq = linear.quantize_weight(weight, fp8_dgrad)
        y = linear.gemm(xq, xs, wq, ws, True, linear.gemm_dtype)[:M, :N]
        # Keep what the backward reads: x.T's tiles instead of x (half the bytes) for an FP8
        # wgrad, W.T's blocks for an FP8 dgrad, the high-precision tensors only for bf16 GEMMs.
        ctx.save_for_backward(
            *((xtq, xts) if fp8_wgrad else (x, None)), *((wtq, ws) if fp8_dgrad else (None, None)), weight
        )
        ctx.linear, ctx.in_dtype, ctx.K = linear, x.dtype, x.shape[1]
        ctx.fp8_dgrad, ctx.fp8_wgrad = fp8_dgrad, fp8_wgrad
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_saved, xts, wtq, ws, weight = ctx.saved_tensors
        linear: FP8Linear = ctx.linear
        M, K, N = dy.shape[0], ctx.K, weight.shape[0]
        _last_input.clear()  # the forward is over: let the cached input go
        dx = dw = None
        if ctx.fp8_dgrad or ctx.fp8_wgrad:
            dyq, dys, dytq, dyts = linear.quantize_activation(dy, ctx.fp8_wgrad)
        if ctx.needs_input_grad[0]:
            if ctx.fp8_dgrad:  # dy tiles along N x W.T blocks (the forward's, transposed)
                dx = linear.gemm(dyq, dys, wtq, ws.t(), True, linear.gemm_dtype)[:M, :K]
            else:
                dx = dy.to(torch.bfloat16) @ weight.to(torch.bfloat16)
        if ctx.needs_input_grad[1]:
            if ctx.fp8_wgrad:  # reduction over tokens: dy.T and x.T both tiled along M
                dw = linear.gemm(dytq, dyts, x_saved, xts, False, torch.float32)[:N, :K]
            else:
                dw = dy.t().to(torch.bfloat16) @ x_saved.to(torch.bfloat16)
        return (
            None if dx is None else dx.to(ctx.in_dtype),
            None if dw is None else dw.to(weight.dtype),
            None,
            None,
        )


class FP8Linear(nn.Module):
    """A bias-free linear whose three GEMMs run in FP8 with DeepSeek-V3's tile/block scaling."""

    def __init__(self, in_features: int, out_features: int, path: str = "auto", pow2_scales: bool = False,
                 dgrad: str = "fp8", wgrad: str = "fp8"):  # fmt: skip
        super().__init__()
        require(path in PATHS, "precision.path", path, ", ".join(PATHS))
        require(dgrad in GEMM_PRECISIONS, "precision.dgrad", dgrad, ", ".join(GEMM_PRECISIONS))
        require(wgrad in GEMM_PRECISIONS, "precision.wgrad", wgrad, ", ".join(GEMM_PRECISIONS))
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.requested_path, self.pow2 = path, pow2_scales
        self.dgrad, self.wgrad = dgrad, wgrad
        self.path = "emulated"

    def extra_repr(self) -> str:
        options = f"path={self.path}, dgrad={self.dgrad}, wgrad={self.wgrad}"
        return f"{self.in_features}, {self.out_features}, {options}"

    def resolve_path(self, device: torch.device) -> str:
        fast = scaled_mm_available(device)
        if self.requested_path == "scaled_mm":
            require(fast, "precision.path", "scaled_mm", "auto or emulated on a device without FP8 GEMMs")
        return "scaled_mm" if self.requested_path != "emulated" and fast else "emulated"

    def quantize_activation(self, x: torch.Tensor, transposed: bool):
        if self.path == "scaled_mm":
            from components.fp8.triton import quantize_activation_triton

            return quantize_activation_triton(x, self.pow2, transposed)
        return quantize_activation(x, self.pow2, transposed)

    def quantize_weight(self, w: torch.Tensor, transposed: bool):
        if self.path == "scaled_mm":
            from components.fp8.triton import quantize_weight_triton

            return quantize_weight_triton(w, self.pow2, transposed)
        return quantize_weight(w, self.pow2, transposed)

    @property
    def gemm_dtype(self) -> torch.dtype:
        """What the forward and input-gradient GEMMs return: bf16 from scaled_mm, fp32 emulated."""
        return torch.bfloat16 if self.path == "scaled_mm" else torch.float32

    def gemm(self, a, sa, b, sb, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
        fn = _gemm_scaled_mm if self.path == "scaled_mm" else _gemm_emulated
        return fn(a, sa, b, sb, b_blocks, out_dtype)

    def quantized_input(self, x: torch.Tensor, rows: torch.Tensor, transposed: bool):
        """``quantize_activation(rows)``, reusing the last FP8Linear's result when it read this
        very tensor (SwiGLU's gate and up, MHA's q/k/v and MLA's two down-projections share one
        input): one pass over it instead of two or three."""
        if x.is_inference():  # no version counter to key on (and no backward to feed)
            return self.quantize_activation(rows, transposed)
        key = (x._version, transposed, self.pow2, self.path)
        if _last_input.get("x") is x and _last_input["key"] == key:
            return _last_input["value"]
        value = self.quantize_activation(rows, transposed)
        # Holding x keeps its memory from being reused (and its id from matching) while cached.
        _last_input.update(x=x, key=key, value=value)
        return value

    @torch.compiler.disable  # Triton launches, a module-level cache and its own autograd: eager
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.path = self.resolve_path(x.device)
        with torch.autocast(x.device.type, enabled=False):  # the recipe sets every dtype itself
            out_dtype = torch.bfloat16 if self.path == "scaled_mm" else x.dtype
            rows = x.reshape(-1, x.shape[-1])
            transposed = self.wgrad == "fp8" and self.weight.requires_grad and torch.is_grad_enabled()
            quantized = self.quantized_input(x, rows, transposed)
            y = _FP8LinearFunction.apply(rows, self.weight, self, quantized)
        return y.reshape(*x.shape[:-1], self.out_features).to(out_dtype)


def keep_small_in_bf16(model: nn.Module, min_features: int) -> list[str]:
    """Swap each ``FP8Linear`` with fewer than ``min_features`` inputs or outputs back to a plain
    ``nn.Linear`` holding the same weight, and name them. A small GEMM gains less from FP8 than its
    quantisation passes cost, so FP8 there is slower than bf16 (torchao filters its float8
    training the same way, by the layer's sides)."""
    kept = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FP8Linear) and min(child.in_features, child.out_features) < min_features:
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight = child.weight
                setattr(parent, name, plain)
                full = f"{parent_name}.{name}" if parent_name else name
                kept.append(f"{full} [{child.in_features}->{child.out_features}]")
    return kept


def fp8_linear_factory(path: str = "auto", pow2_scales: bool = False, dgrad: str = "fp8", wgrad: str = "fp8"):
    """A ``LinearFactory`` making ``FP8Linear``s with these options."""

    def make(in_features: int, out_features: int) -> nn.Module:
        return FP8Linear(in_features, out_features, path, pow2_scales, dgrad, wgrad)

    return make
