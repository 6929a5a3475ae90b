"""Load Hugging Face DeepseekV3 checkpoints (config.json + weights) into our ``Transformer``.

Used to anchor our components to an independent implementation (the parity test) and to start
ablations from released weights. Accepts both expert layouts: the fused 3-D tensors of
transformers >= 5 (``mlp.experts.gate_up_proj``) and the per-expert matrices of DeepSeek's own
checkpoints (``mlp.experts.{e}.gate_proj.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from components.registry import require, spec_error
from research.model.transformer import ModelConfig, Transformer

YARN_REFUSED = (
    "'default': YaRN is not implemented, and it changes RoPE's frequencies and the attention scale at "
    "every length, so weights trained with it (the released V3) would not compute what they learnt; "
    "import a config without rope_scaling (a model of V3's architecture at your own size)"
)


def _as_mapping(config: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    """A ``config.json`` mapping, or a transformers ``DeepseekV3Config`` (its ``to_dict()``)."""
    if isinstance(config, Mapping):
        return config
    if callable(getattr(config, "to_dict", None)):
        return config.to_dict()
    raise spec_error(
        "config", type(config).__name__, "a config.json mapping or a transformers DeepseekV3Config"
    )


def config_from_hf_deepseek_v3(hf: Mapping[str, Any] | Any) -> ModelConfig:
    """Translate a DeepseekV3 ``config.json`` mapping (or ``DeepseekV3Config``) into a ``ModelConfig``."""
    hf = _as_mapping(hf)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    require(rope_type == "default", "rope_scaling.type", rope_type, YARN_REFUSED)
    require(not hf.get("attention_bias", False), "attention_bias", hf.get("attention_bias"), "False")
    require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "'silu'")
    attention = {
        "name": "mla",
        "n_heads": hf["num_attention_heads"],
        "q_lora_rank": hf.get("q_lora_rank") or 0,
        "kv_lora_rank": hf["kv_lora_rank"],
        "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"],
        "v_head_dim": hf["v_head_dim"],
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "norm_eps": 1e-6,  # transformers' MLA latent norms use their default eps, not rms_norm_eps
    }
    if hf.get("n_routed_experts"):
        ffn = {
            "name": "moe",
            "n_routed_experts": hf["n_routed_experts"],
            "top_k": hf["num_experts_per_tok"],
            "expert_dim": hf["moe_intermediate_size"],
            "n_shared_experts": hf.get("n_shared_experts") or 0,
            "score_func": hf.get("scoring_func", "sigmoid"),
            "route_scale": float(hf.get("routed_scaling_factor", 1.0)),
            "n_groups": hf.get("n_group") or 1,
            "topk_groups": hf.get("topk_group") or 1,
            "norm_topk": bool(hf.get("norm_topk_prob", True)),
            "first_k_dense": hf.get("first_k_dense_replace") or 0,
            "dense_hidden_dim": hf["intermediate_size"],
        }
    else:
        ffn = {"name": "dense", "hidden_dim": hf["intermediate_size"]}
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        attention=attention,
        ffn=ffn,
        # The released router keeps a correction bias: DeepSeek-V3 was trained aux-loss-free.
        balance={"name": "aux_free"} if ffn["name"] == "moe" else {"name": "none"},
        mtp={"depth": 0, "weight": 0.3},  # transformers' model carries no MTP weights
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _deinterleave_rope_rows(w: torch.Tensor, n_heads: int, rope_dim: int) -> torch.Tensor:
    """Reorder each head's last ``rope_dim`` output rows from pairs (2j, 2j+1) to halves (j, j+R/2)."""
    perm = torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))
    w = w.reshape(n_heads, -1, w.shape[-1]).clone()
    w[:, -rope_dim:] = w[:, -rope_dim:][:, perm]
    return w.reshape(-1, w.shape[-1])


_RENAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "ffn.w_gate.weight",
    "mlp.up_proj.weight": "ffn.w_up.weight",
    "mlp.down_proj.weight": "ffn.w_down.weight",
    "mlp.gate.weight": "ffn.router.weight",
    "mlp.gate.e_score_correction_bias": "ffn.router.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared.w_gate.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared.w_up.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared.w_down.weight",
}
_PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _convert_layer(
    hf_layer: dict[str, torch.Tensor],
    prefix: str,
    cfg: ModelConfig,
    interleaved: bool,
    out: dict[str, torch.Tensor],
) -> None:
    attn = cfg.attention
    H, rope = attn["n_heads"], attn["qk_rope_head_dim"]
    per_expert: dict[tuple[int, str], torch.Tensor] = {}
    for key, w in hf_layer.items():
        if key in _RENAMES:
            if interleaved and key in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight"):
                w = _deinterleave_rope_rows(w, H, rope)
            elif interleaved and key == "self_attn.kv_a_proj_with_mqa.weight":
                w = _deinterleave_rope_rows(w, 1, rope)
            out[prefix + _RENAMES[key]] = w
        elif key == "mlp.experts.gate_up_proj":  # [E, 2H, C], gate rows first
            out[prefix + "ffn.experts.w_gate_up"] = w.transpose(1, 2)
        elif key == "mlp.experts.down_proj":  # [E, C, H]
            out[prefix + "ffn.experts.w_down"] = w.transpose(1, 2)
        elif m := _PER_EXPERT.fullmatch(key):
            per_expert[(int(m[1]), m[2])] = w
        else:
            raise spec_error(
                "state_dict key",
                prefix.replace("blocks.", "model.layers.") + key,
                "DeepseekV3 layer weights (this one has no counterpart in our model)",
            )
    if per_expert:
        n = cfg.ffn["n_routed_experts"]
        gate = torch.stack([per_expert[(e, "gate_proj")] for e in range(n)])  # [E, H, C]
        up = torch.stack([per_expert[(e, "up_proj")] for e in range(n)])
        down = torch.stack([per_expert[(e, "down_proj")] for e in range(n)])  # [E, C, H]
        out[prefix + "ffn.experts.w_gate_up"] = torch.cat((gate, up), dim=1).transpose(1, 2)
        out[prefix + "ffn.experts.w_down"] = down.transpose(1, 2)


def from_hf_deepseek_v3(
    config: Mapping[str, Any] | Any, state_dict: Mapping[str, torch.Tensor]
) -> Transformer:
    """Build our model from a DeepseekV3 ``config.json`` mapping (or ``DeepseekV3Config``) and its
    (transformers) state dict."""
    config = _as_mapping(config)
    cfg = config_from_hf_deepseek_v3(config)
    interleaved = bool(config.get("rope_interleave", True))
    layers: dict[int, dict[str, torch.Tensor]] = {}
    ours: dict[str, torch.Tensor] = {}
    top = {
        "model.embed_tokens.weight": "embed.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "head.weight",
    }
    for key, w in state_dict.items():
        if key in top:
            ours[top[key]] = w
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
            if int(m[1]) < cfg.n_layers:  # deeper layers hold DeepSeek's MTP weights: not imported
                layers.setdefault(int(m[1]), {})[m[2]] = w
        elif "rotary_emb" not in key:
            raise spec_error(
                "state_dict key", key, "DeepseekV3 weights (this one has no counterpart in our model)"
            )
    for i, layer in sorted(layers.items()):
        _convert_layer(layer, f"blocks.{i}.", cfg, interleaved, ours)
    if cfg.tie_embeddings:
        ours["head.weight"] = ours["embed.weight"]

    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    require(
        not missing and not unexpected,
        "state_dict",
        f"missing {missing}, unexpected {unexpected}",
        "a complete DeepseekV3 checkpoint for this config",
    )
    return model
