import os
import subprocess
import sys

import pytest
import torch

from research.model.transformer import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tiny specs per axis, shared by the tests (d_model = 32).
ATTENTION_SPECS = {
    "mha": {"name": "mha", "n_heads": 4},
    "gqa": {"name": "gqa", "n_heads": 4, "n_kv_heads": 2},
    "mla": {
        "name": "mla",
        "n_heads": 4,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
    },
}
FFN_SPECS = {
    "dense": {"name": "dense", "hidden_dim": 48},
    "moe": {
        "name": "moe",
        "n_routed_experts": 8,
        "top_k": 2,
        "expert_dim": 16,
        "n_shared_experts": 1,
        "n_groups": 2,
        "topk_groups": 1,
        "first_k_dense": 1,
        "dense_hidden_dim": 48,
    },
}


def tiny_config(attention="mha", ffn="dense", balance="none", mtp_depth=0, **overrides) -> ModelConfig:
    """A d_model=32, 2-layer model; each axis by its name in the specs above, or a full spec dict."""
    cfg = dict(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        attention=attention if isinstance(attention, dict) else dict(ATTENTION_SPECS[attention]),
        ffn=ffn if isinstance(ffn, dict) else dict(FFN_SPECS[ffn]),
        balance=balance if isinstance(balance, dict) else {"name": balance},
        mtp={"depth": mtp_depth, "weight": 0.3},
        init_std=0.1,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory, monkeypatch_session=None):
    """One token cache for every CLI test, so the standard library is tokenized once per session."""
    import os

    cache = tmp_path_factory.mktemp("token-cache")
    old = os.environ.get("LAB_CACHE_DIR")
    os.environ["LAB_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LAB_CACHE_DIR", None)
    else:
        os.environ["LAB_CACHE_DIR"] = old


def assert_ok_under_triton_interpreter(module: str) -> None:
    """Run ``python -m module`` with ``TRITON_INTERPRET=1`` (read when Triton is imported, hence a
    process of its own): Triton kernels on a CPU. The module prints "ok" when its checks pass."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr[-2000:]
