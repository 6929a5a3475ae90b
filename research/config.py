"""From the composed Hydra config to the objects it describes (light: no Lightning import)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from components.registry import require
from research.model import ModelConfig

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}  # name -> Lightning precision


def model_config(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    """The model's spec from the config groups; sizes come from the ``model`` preset."""
    m = cfg.model
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=m.d_model,
        n_layers=m.n_layers,
        attention=OmegaConf.to_container(cfg.attention, resolve=True),
        ffn=OmegaConf.to_container(cfg.ffn, resolve=True),
        balance=OmegaConf.to_container(cfg.balance, resolve=True),
        mtp=OmegaConf.to_container(cfg.mtp, resolve=True),
        norm_eps=m.norm_eps,
        init_std=m.init_std,
        tie_embeddings=m.tie_embeddings,
    )


def precision_of(cfg: DictConfig) -> str:
    name = cfg.precision.name
    if name == "auto":
        name = "bf16" if torch.cuda.is_available() else "fp32"
    require(name in PRECISIONS, "precision.name", name, ", ".join(["auto", *PRECISIONS]))
    return PRECISIONS[name]
