"""Our model against an independent implementation: transformers' DeepseekV3ForCausalLM."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from research.model.hf_import import from_hf_deepseek_v3  # noqa: E402


def tiny_hf_config(rope_interleave: bool):
    return transformers.DeepseekV3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_logits_match_transformers_deepseek_v3(rope_interleave):
    torch.manual_seed(0)
    hf_cfg = tiny_hf_config(rope_interleave)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # a non-zero correction bias, so selection != plain top-k of the scores
        for layer in hf.model.layers[hf_cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.2 * torch.randn(hf_cfg.n_routed_experts))

    ours = from_hf_deepseek_v3(hf_cfg.to_dict(), hf.state_dict()).eval()
    assert ours.cfg.attention["q_lora_rank"] == 32 and ours.first_k_dense == 1

    idx = torch.randint(0, hf_cfg.vocab_size, (3, 24))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx).logits
    assert expected.std() > 0.1, "logits too small for the comparison to mean anything"
    assert (got - expected).abs().max().item() <= 1e-4
    # the correction bias really changed some routing decisions in this batch
    router = ours.blocks[1].ffn.router
    x = torch.randn(64, 64)
    with torch.no_grad():
        plain = (x @ router.weight.T).sigmoid().topk(2).indices.sort().values
        biased = router(x)[1].sort().values
    assert not torch.equal(plain, biased)


def test_per_expert_checkpoint_layout_loads_the_same():
    """DeepSeek's own checkpoints store each expert's matrices separately."""
    torch.manual_seed(1)
    hf_cfg = tiny_hf_config(True)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    sd = dict(hf.state_dict())
    for i in range(hf_cfg.first_k_dense_replace, hf_cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        gate_up, down = sd.pop(p + "gate_up_proj"), sd.pop(p + "down_proj")
        gate, up = gate_up.chunk(2, dim=1)
        for e in range(hf_cfg.n_routed_experts):
            sd[f"{p}{e}.gate_proj.weight"], sd[f"{p}{e}.up_proj.weight"] = gate[e], up[e]
            sd[f"{p}{e}.down_proj.weight"] = down[e]
    fused = from_hf_deepseek_v3(hf_cfg.to_dict(), hf.state_dict()).eval()
    split = from_hf_deepseek_v3(hf_cfg, sd).eval()  # the config object itself, as transformers gives it
    idx = torch.randint(0, hf_cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(split(idx).logits, fused(idx).logits, rtol=0, atol=0)


def test_unknown_weight_and_yarn_are_refused():
    hf_cfg = tiny_hf_config(True)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        from_hf_deepseek_v3(hf_cfg.to_dict(), sd)
    cfg = hf_cfg.to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match=r"rope_scaling\.type='yarn' .*import a config without rope_scaling"):
        from_hf_deepseek_v3(cfg, hf.state_dict())
    with pytest.raises(ValueError, match=r"config='list' is not allowed"):
        from_hf_deepseek_v3([], hf.state_dict())
