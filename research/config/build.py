"""From the composed Hydra config to the objects it describes (light: no Lightning import)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from components.fp8 import fp8_linear_factory
from components.linear import LinearFactory, make_linear
from components.moe import GroupedExperts
from components.registry import require
from research.model.transformer import ModelConfig, Transformer

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}  # name -> Lightning precision
FP8_RECIPES = ("fp8", "fp8_rowwise")  # bf16 autocast around FP8 projections (fp32 on CPU)


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
    if name in FP8_RECIPES:
        if name == "fp8_rowwise":
            _require_torchao()
        else:
            experts = cfg.precision.get("experts")
            require(experts in ("fp8", "bf16"), "precision.experts", experts, "fp8, bf16")
        name = "bf16" if torch.cuda.is_available() else "fp32"
    require(name in PRECISIONS, "precision.name", name, ", ".join(["auto", *PRECISIONS, *FP8_RECIPES]))
    return PRECISIONS[name]


def linear_factory(cfg: DictConfig) -> LinearFactory:
    """The projections' recipe: plain ``nn.Linear``, or DeepSeek-V3's block-wise FP8."""
    p = cfg.precision
    if p.name == "fp8":
        return fp8_linear_factory(p.path, p.pow2_scales, p.dgrad, p.wgrad)
    return make_linear


def apply_precision_recipe(model: Transformer, cfg: DictConfig) -> None:
    """What the LinearFactory cannot reach: ``fp8`` puts the routed experts' grouped GEMMs under
    the same recipe; ``fp8_rowwise`` lets torchao swap the factory's projections (not the head)."""
    precision_of(cfg)  # the options are checked before anything is changed
    p = cfg.precision
    if p.name == "fp8" and p.experts == "fp8":
        for m in model.modules():
            if isinstance(m, GroupedExperts):
                m.fp8 = {"pow2": p.pow2_scales, "dgrad": p.dgrad, "wgrad": p.wgrad}
    if p.name != "fp8_rowwise":
        return
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=lambda module, fqn: fqn != "head")  # fmt: skip


def _require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "precision=fp8_rowwise needs torchao (pip install torchao) and a GPU with FP8"
        ) from e
