"""From the composed Hydra config to the objects it describes (light: no Lightning import)."""

from __future__ import annotations

import re
from collections import Counter

import torch
from omegaconf import DictConfig, OmegaConf

from components.fp8 import fp8_linear_factory, keep_small_in_bf16, scaled_mm_available
from components.fp8.format import PATHS
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
            experts, min_features = cfg.precision.get("experts"), cfg.precision.get("min_features", 0)
            require(experts in ("fp8", "bf16"), "precision.experts", experts, "fp8, bf16")
            path = cfg.precision.get("path", "auto")
            require(path in PATHS, "precision.path", path, ", ".join(PATHS))
            fast = torch.cuda.is_available() and scaled_mm_available(torch.device("cuda"))
            require(path != "scaled_mm" or fast, "precision.path", path,
                    "auto or emulated on a device without FP8 GEMMs")  # fmt: skip
            whole = isinstance(min_features, int) and not isinstance(min_features, bool) and min_features >= 0
            require(whole, "precision.min_features", min_features, "a whole number, 0 for every layer in FP8")
        name = "bf16" if torch.cuda.is_available() else "fp32"
    require(name in PRECISIONS, "precision.name", name, ", ".join(["auto", *PRECISIONS, *FP8_RECIPES]))
    return PRECISIONS[name]


def linear_factory(cfg: DictConfig) -> LinearFactory:
    """The projections' recipe: plain ``nn.Linear``, or DeepSeek-V3's block-wise FP8."""
    p = cfg.precision
    if p.name == "fp8":
        return fp8_linear_factory(p.path, p.pow2_scales, p.dgrad, p.wgrad)
    return make_linear


def apply_precision_recipe(model: Transformer, cfg: DictConfig) -> str | None:
    """What the LinearFactory cannot reach: ``fp8`` keeps in bf16 the projections and experts too
    small to gain (``precision.min_features``) and puts the other routed experts' grouped GEMMs
    under the same recipe; ``fp8_rowwise`` lets torchao swap the factory's projections (not the
    head). Returns, for ``fp8``, the line that says what stayed in bf16 and by which rule."""
    precision_of(cfg)  # the options are checked before anything is changed
    p = cfg.precision
    if p.name == "fp8":
        min_features = p.get("min_features", 0)
        kept = keep_small_in_bf16(model, min_features)
        for name, m in model.named_modules():
            if not isinstance(m, GroupedExperts):
                continue
            E, C, H2 = m.w_gate_up.shape
            if min(C, H2 // 2) < min_features:
                kept.append(f"{name} [{E} experts, {C}->{H2 // 2}]")
            elif p.experts == "fp8":
                m.fp8 = {"pow2": p.pow2_scales, "dgrad": p.dgrad, "wgrad": p.wgrad}
        return kept_line(kept, min_features)
    if p.name != "fp8_rowwise":
        return None
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=lambda module, fqn: fqn != "head")  # fmt: skip
    return None


def kept_line(kept: list[str], min_features: int) -> str:
    """The run's line on what FP8 left in bf16, by name with block indices folded:
    ``... stay bf16 ...: blocks.*.attn.wq [256->256] x6, ...``."""
    if not kept:
        return f"precision=fp8: every projection in FP8 (none below precision.min_features={min_features})"
    counts = Counter(re.sub(r"\.\d+\.", ".*.", name) for name in kept)
    layers = ", ".join(name + (f" x{n}" if n > 1 else "") for name, n in counts.items())
    return (f"precision=fp8: {len(kept)} layers with a side below precision.min_features={min_features} stay "
            f"bf16, too small for FP8 to pay (0 puts every layer in FP8): {layers}")  # fmt: skip


def _require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "precision=fp8_rowwise needs torchao (pip install torchao) and a GPU with FP8"
        ) from e
