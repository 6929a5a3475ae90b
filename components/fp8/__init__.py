"""DeepSeek-V3's fine-grained FP8 recipe: ``format`` (tile and block quantisation, the GEMMs),
``linear`` (``FP8Linear`` and its factory), ``triton`` (the quantisers as Triton kernels, bit for
bit ``format``'s; imported only on a GPU path)."""

from components.fp8.format import (
    E4M3,
    ROWS,
    TILE,
    dequantize_blocks,
    dequantize_tiles,
    fake_quantize_blocks,
    fake_quantize_tiles,
    pad_to_tiles,
    quantize_activation,
    quantize_blocks,
    quantize_tiles,
    quantize_weight,
    round_up,
    scaled_mm_available,
)
from components.fp8.linear import FP8Linear, fp8_linear_factory, keep_small_in_bf16

__all__ = ["E4M3", "ROWS", "TILE", "FP8Linear", "dequantize_blocks", "dequantize_tiles",
           "fake_quantize_blocks", "fake_quantize_tiles", "fp8_linear_factory", "keep_small_in_bf16",
           "pad_to_tiles",
           "quantize_activation", "quantize_blocks", "quantize_tiles", "quantize_weight", "round_up",
           "scaled_mm_available"]  # fmt: skip
