"""Bad specs fail at build time with one line naming the key, the value and what is allowed."""

import pytest

from research.model.transformer import Transformer
from tests.conftest import ATTENTION_SPECS, FFN_SPECS, tiny_config

MOE = FFN_SPECS["moe"]  # 8 experts in 2 groups, top-2, first layer dense
BAD = [
    ("attention.name", dict(attention={"name": "flash"}), "'gqa', 'mha', 'mla'"),
    ("ffn.name", dict(ffn={"name": "mixture"}), "'dense', 'moe'"),
    ("balance.name", dict(balance={"name": "bogus"}), "aux_free, aux_loss, seq_aux, z_loss joined by '+'"),
    ("attention.kv_lora_rnk", dict(attention={**ATTENTION_SPECS["mla"], "kv_lora_rnk": 8}), "kv_lora_rank"),
    ("attention.n_kv_heads", dict(attention={"name": "gqa", "n_heads": 4, "n_kv_heads": 3}), "divisor"),
    ("attention.n_heads", dict(attention={"name": "mha", "n_heads": 5}), "d_model=32"),
    ("attention.head_dim", dict(attention={"name": "mha", "n_heads": 4, "head_dim": 7}), "even"),
    ("attention.qk_rope_head_dim", dict(attention={**ATTENTION_SPECS["mla"], "qk_rope_head_dim": 5}), "even"),
    ("attention.q_lora_rank", dict(attention={**ATTENTION_SPECS["mla"], "q_lora_rank": -1}), "0"),
    ("ffn.top_k", dict(ffn={**MOE, "top_k": 9}), "n_routed_experts=8"),
    ("ffn.top_k", dict(ffn={**MOE, "top_k": 5, "n_groups": 2, "topk_groups": 1}), "experts per group"),
    ("ffn.n_groups", dict(ffn={**MOE, "n_groups": 3}), "divisor"),
    ("ffn.topk_groups", dict(ffn={**MOE, "topk_groups": 3}), "n_groups=2"),
    ("ffn.score_func", dict(ffn={**MOE, "score_func": "relu"}), "sigmoid, softmax"),
    ("ffn.gemm_backend", dict(ffn={**MOE, "gemm_backend": "cutlass"}), "grouped_mm"),
    ("ffn.first_k_dense", dict(ffn={**MOE, "first_k_dense": 5}), "n_layers=2"),
    ("ffn.hidden_dim", dict(ffn={"name": "dense", "hidden_dim": 0}), "positive"),
    ("balance.gamma", dict(balance={"name": "aux_free", "gamma": -1.0}), "non-negative"),
    ("balance.alpha", dict(balance={"name": "aux_free", "alpha": 1e-4}), "keys of 'aux_free'"),
    ("mtp.depth", dict(mtp={"depth": -1}), ">= 0"),
    ("mtp.weight", dict(mtp={"depth": 1, "weight": -0.3}), "non-negative"),
    ("mtp", dict(mtp={"depht": 1}), "depth, weight"),
    ("vocab_size", dict(vocab_size=0), "positive"),
]


@pytest.mark.parametrize(("key", "overrides", "allowed"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_spec_raises_one_line_value_error(key, overrides, allowed):
    with pytest.raises(ValueError) as err:
        Transformer(tiny_config(**{"ffn": "moe", **overrides}))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}="), message
    assert allowed in message, message


def test_sequence_shorter_than_mtp_depth():
    import torch

    model = Transformer(tiny_config(mtp_depth=2))
    with pytest.raises(ValueError, match=r"mtp\.depth=2"):
        model(torch.zeros(1, 2, dtype=torch.long), targets=torch.zeros(1, 2, dtype=torch.long))


NUMERIC = [
    ("trainer.max_steps=abc", "trainer.max_steps='abc' is not allowed; allowed: an integer >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is not allowed; allowed: an integer >= 1"),
    ("trainer.max_steps=2.5", "trainer.max_steps=2.5 is not allowed; allowed: an integer >= 1"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every=0 is not allowed"),
    ("trainer.log_every=0", "trainer.log_every=0 is not allowed"),
    ("trainer.val_every=0", "trainer.val_every=0 is not allowed"),
    ("optim.lr=-1", "optim.lr=-1 is not allowed; allowed: a number > 0"),
    ("optim.lr=0", "optim.lr=0 is not allowed; allowed: a number > 0"),
    ("data.batch_size=0", "data.batch_size=0 is not allowed; allowed: an integer >= 1"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5 is not allowed; allowed: a number in (0, 1]"),
    ("trainer.devices=0", "trainer.devices=0 is not allowed; allowed: auto, an integer >= 1, or a list"),
    ("trainer.devices=many", "trainer.devices='many' is not allowed; allowed: auto, an integer >= 1"),
    (
        "eval.decode_batches=[1,0]",
        "eval.decode_batches=[1, 0] is not allowed; allowed: a non-empty list of "
        "positive integers (batch sizes)",
    ),
    ("eval.decode_contexts=[]", "eval.decode_contexts=[] is not allowed; allowed: a non-empty list"),
    ("eval.decode_memory_gib=0", "eval.decode_memory_gib=0 is not allowed; allowed: a number > 0"),
]


@pytest.mark.parametrize(("override", "message"), NUMERIC, ids=[n[0] for n in NUMERIC])
def test_numeric_keys_out_of_type_or_range_are_refused_by_name(override, message):
    from research.training.preflight import checked_config

    with pytest.raises(ValueError) as err:
        checked_config(["model=tiny", override])
    assert str(err.value).startswith(message), err.value


def test_numeric_keys_in_range_pass():
    from research.training.preflight import checked_config

    in_range = ["trainer.devices=[0,1]", "trainer.max_steps=1", "data.val_fraction=1"]
    cfg = checked_config(["model=tiny", *in_range])
    assert list(cfg.trainer.devices) == [0, 1]
