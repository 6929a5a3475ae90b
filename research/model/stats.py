"""Print parameters, active parameters per token, training FLOPs and KV-cache size per token for
MHA, GQA and MLA at DeepSeek-V2-Lite-like and DeepSeek-V3-like shapes.

    python -m research.model.stats

Models are built on the ``meta`` device: shapes only, no memory, so even the 671B shape is instant.
"""

from __future__ import annotations

import torch

from research.model.transformer import ModelConfig, Transformer

# Attention variants at each shape; the rest of the model is DeepSeek's own (MoE, first-k dense).
SHAPES = {
    "V2-Lite-like": dict(
        vocab_size=102400,
        d_model=2048,
        n_layers=27,
        ffn={
            "name": "moe",
            "n_routed_experts": 64,
            "top_k": 6,
            "expert_dim": 1408,
            "n_shared_experts": 2,
            "score_func": "softmax",
            "first_k_dense": 1,
            "dense_hidden_dim": 10944,
        },
        attention={
            "mha": {"name": "mha", "n_heads": 16, "head_dim": 128},
            "gqa": {"name": "gqa", "n_heads": 16, "n_kv_heads": 4, "head_dim": 128},
            "mla": {
                "name": "mla",
                "n_heads": 16,
                "q_lora_rank": 0,
                "kv_lora_rank": 512,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
            },
        },
    ),
    "V3-like": dict(
        vocab_size=129280,
        d_model=7168,
        n_layers=61,
        ffn={
            "name": "moe",
            "n_routed_experts": 256,
            "top_k": 8,
            "expert_dim": 2048,
            "n_shared_experts": 1,
            "route_scale": 2.5,
            "n_groups": 8,
            "topk_groups": 4,
            "first_k_dense": 3,
            "dense_hidden_dim": 18432,
        },
        attention={
            "mha": {"name": "mha", "n_heads": 128, "head_dim": 128},
            "gqa": {"name": "gqa", "n_heads": 128, "n_kv_heads": 8, "head_dim": 128},
            "mla": {
                "name": "mla",
                "n_heads": 128,
                "q_lora_rank": 1536,
                "kv_lora_rank": 512,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
            },
        },
    ),
}
SEQ_LEN = 4096


def build_on_meta(shape: str, attention: str, mtp_depth: int = 0) -> Transformer:
    spec = SHAPES[shape]
    cfg = ModelConfig(
        vocab_size=spec["vocab_size"],
        d_model=spec["d_model"],
        n_layers=spec["n_layers"],
        attention=spec["attention"][attention],
        ffn=spec["ffn"],
        balance={"name": "aux_free"},
        mtp={"depth": mtp_depth, "weight": 0.3},
    )
    with torch.device("meta"):
        return Transformer(cfg)


def rows() -> list[dict[str, object]]:
    out = []
    for shape in SHAPES:
        mha_bytes = None
        for attention in ("mha", "gqa", "mla"):
            model = build_on_meta(shape, attention)
            kv = model.kv_cache_bytes_per_token()
            mha_bytes = mha_bytes or kv
            out.append(
                {
                    "shape": shape,
                    "attention": attention,
                    "params_B": model.num_params() / 1e9,
                    "active_B": model.num_active_params() / 1e9,
                    "tflops_per_token": model.flops_per_token(SEQ_LEN) / 1e12,
                    "kv_values_per_layer": model.blocks[0].attn.kv_cache_values_per_token(),
                    "kv_KiB_per_token": kv / 1024,
                    "kv_vs_mha": kv / mha_bytes,
                }
            )
    return out


def main() -> None:
    header = (
        f"{'shape':<13}{'attention':<10}{'params':>10}{'active':>10}{'train TFLOP':>13}"
        f"{'KV values':>11}{'KV KiB':>9}{'KV vs MHA':>11}"
    )
    print(f"Per token; KV cache in bf16 summed over layers; training FLOPs at seq_len {SEQ_LEN}; no MTP.")
    print(header)
    print("-" * len(header))
    for r in rows():
        print(
            f"{r['shape']:<13}{r['attention']:<10}{r['params_B']:>9.2f}B{r['active_B']:>9.2f}B"
            f"{r['tflops_per_token']:>13.3f}{r['kv_values_per_layer']:>11}{r['kv_KiB_per_token']:>9.1f}"
            f"{r['kv_vs_mha']:>10.1%}"
        )


if __name__ == "__main__":
    main()
