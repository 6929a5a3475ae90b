"""Speed options of a training run that leave its numerics alone: ``trainer.compile`` and
``trainer.fused_loss``, each ``auto``, ``true`` or ``false``."""

from __future__ import annotations

from typing import Any

import torch

from components.loss import chunk_for
from components.registry import require
from research.model import Transformer

CHOICES = "auto, true, false"


def enabled(key: str, setting: Any, device: torch.device, sharded: bool = False) -> bool:
    """``auto`` turns an option on on a GPU, where fused kernels and fewer launches pay, and off on
    a CPU, where compiling costs more than a test's few steps; and off under FSDP or DeepSpeed,
    whose parameter wrappers it has not been measured with (``true`` still asks for it)."""
    if setting == "auto":
        return device.type == "cuda" and not sharded
    require(isinstance(setting, bool), f"trainer.{key}", setting, CHOICES)
    return setting


def compile_blocks(model: Transformer, **options: Any) -> None:
    """``torch.compile`` every block in place (the MTP modules' too). Compiling block by block
    keeps compile time flat in depth (blocks of one shape share their compiled code) and leaves
    parameter names and checkpoints as they are. ``options`` go to ``torch.compile``."""
    for block in [*model.blocks, *(m.block for m in model.mtp)]:
        block.compile(**options)


def fuse_loss(model: Transformer, sharded: bool = False) -> None:
    """Head and cross-entropy fused by chunks of tokens (``components.loss``): the training loss
    without the logits. It reads the head's weight directly, which a sharding wrapper splits."""
    require(not sharded, "trainer.fused_loss", True, "false or auto under FSDP or DeepSpeed")
    model.loss_chunk = chunk_for(model.cfg.vocab_size)
