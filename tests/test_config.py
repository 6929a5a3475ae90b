"""The config tree composes for every choice, and the size presets are the sizes they claim."""

import itertools

import pytest
import torch
from hydra import compose, initialize_config_module

from research.config.build import model_config
from research.model.transformer import Transformer

GROUPS = {
    "attention": ["mha", "gqa", "mla"],
    "ffn": ["dense", "moe"],
    "balance": ["none", "aux_loss", "aux_free", "seq_aux", "aux_free+seq_aux", "z_loss", "aux_free+z_loss"],
    "mtp": ["none", "d1", "d2"],
}


def build(overrides, vocab_size=256):
    with initialize_config_module("research.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with torch.device("meta"):
        return Transformer(model_config(cfg, vocab_size))


@pytest.mark.parametrize("model", ["tiny", "small", "base"])
def test_every_preset_builds_every_attention_and_ffn(model):
    for attention, ffn in itertools.product(GROUPS["attention"], GROUPS["ffn"]):
        build([f"model={model}", f"attention={attention}", f"ffn={ffn}"])


@pytest.mark.parametrize(
    ("model", "vocab", "low", "high"), [("small", 256, 5e6, 20e6), ("base", 32000, 100e6, 500e6)]
)
def test_preset_sizes(model, vocab, low, high):
    for ffn in GROUPS["ffn"]:
        n = build([f"model={model}", f"ffn={ffn}"], vocab).num_params()
        assert low <= n <= high, (model, ffn, n)


def test_moe_presets_match_dense_active_ffn_width():
    for model in ("tiny", "small"):
        with initialize_config_module("research.conf", version_base="1.3"):
            m = compose("train", overrides=[f"model={model}"]).model
        assert (m.top_k + m.n_shared_experts) * m.expert_dim == m.ffn_hidden


def test_balance_and_mtp_choices_reach_the_model():
    model = build(["ffn=moe", "balance=aux_free+seq_aux", "mtp=d2"])
    layer = model.moe_layers()[0]
    assert [type(r).__name__ for r in layer.balance.rules] == ["AuxFree", "SeqAux"]
    assert layer.balance.rules[0].gamma == 1e-3 and layer.balance.rules[1].alpha == 1e-4
    assert model.mtp_depth == 2 and len(model.mtp) == 2
