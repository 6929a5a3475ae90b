"""The model layer: ``ModelConfig -> Transformer`` from the components (``transformer``), the
Hugging Face import (``hf_import``), and the parameter / KV-cache counts at real shapes (``stats``)."""

from research.model.transformer import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer"]
