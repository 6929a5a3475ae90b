import torch
import torch.nn.functional as F

from research.model.stats import build_on_meta, main
from research.model.transformer import Transformer
from tests.conftest import tiny_config


def test_mtp_depth_zero_is_the_plain_lm():
    model = Transformer(tiny_config("mla", "dense", mtp_depth=0))
    idx = torch.randint(0, 64, (2, 10))
    targets = torch.randint(0, 64, (2, 10))
    out = model(idx, targets)
    assert out.mtp_loss is None and len(model.mtp) == 0
    expected = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.lm_loss, expected, rtol=0, atol=0)


def test_mtp_modules_do_not_change_the_main_model():
    plain = Transformer(tiny_config("mla", "moe", mtp_depth=0)).eval()
    with_mtp = Transformer(tiny_config("mla", "moe", mtp_depth=2)).eval()
    missing, unexpected = with_mtp.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    idx = torch.randint(0, 64, (2, 10))
    targets = torch.randint(0, 64, (2, 10))
    a, b = plain(idx, targets), with_mtp(idx, targets)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)  # inference: main head only
    torch.testing.assert_close(b.lm_loss, a.lm_loss, rtol=0, atol=0)
    torch.testing.assert_close(b.loss, b.lm_loss + 0.3 * b.mtp_loss)


def test_mtp_loss_follows_the_sequential_chain():
    """Depth k sees token i+k and predicts token i+k+1; depth k+1 builds on depth k's states."""
    model = Transformer(tiny_config("gqa", "dense", mtp_depth=2)).eval()
    idx = torch.randint(0, 64, (2, 10))
    seq = torch.cat((idx, torch.randint(0, 64, (2, 1))), dim=1)
    targets = seq[:, 1:]
    pos = torch.arange(10)
    h = model.embed(idx)
    for block in model.blocks:
        h = block(h, pos)
    losses = []
    for k in (1, 2):
        mtp = model.mtp[k - 1]
        x = mtp.proj(
            torch.cat((mtp.hidden_norm(h[:, : 10 - k]), mtp.embed_norm(model.embed(seq[:, k:10]))), -1)
        )
        h = mtp.block(x, pos[: 10 - k])
        logits = model.head(mtp.out_norm(h))  # predicts seq[i + k + 1]
        losses.append(F.cross_entropy(logits.flatten(0, 1), seq[:, k + 1 :].flatten()))
    out = model(idx, targets)
    torch.testing.assert_close(out.mtp_loss, (losses[0] + losses[1]) / 2)


def test_param_counts_and_flops_by_hand():
    V, C, L, H, D, hidden, T = 64, 32, 2, 4, 8, 48, 16
    dense = Transformer(tiny_config("mha", "dense"))
    per_layer = 4 * C * C + 3 * C * hidden + 2 * C
    assert dense.num_params() == V * C + L * per_layer + C + C * V
    assert dense.num_active_params() == dense.num_params()
    matmul = L * (4 * C * C + 3 * C * hidden) + C * V
    assert dense.flops_per_token(T) == 6 * matmul + 3 * L * H * (D + D) * T

    moe = Transformer(tiny_config("mha", "moe"))  # layer 0 dense, layer 1: 8 experts of 16, top-2, 1 shared
    expert = 3 * C * 16
    moe_layer = 4 * C * C + 2 * C + 8 * C + 8 * expert + expert  # attn, norms, router, routed, shared
    assert moe.num_params() == V * C + per_layer + moe_layer + C + C * V
    assert moe.num_active_params() == moe.num_params() - 6 * expert


def test_tied_embeddings_share_one_matrix():
    model = Transformer(tiny_config(tie_embeddings=True))
    assert model.head.weight is model.embed.weight
    untied = Transformer(tiny_config())
    assert untied.num_params() - model.num_params() == 64 * 32


def test_deepseek_v3_shape_has_the_papers_size():
    """671B parameters, 37B active per token (DeepSeek-V3 report), counted on the meta device."""
    model = build_on_meta("V3-like", "mla")
    assert 665e9 < model.num_params() < 677e9
    assert 36e9 < model.num_active_params() < 38.5e9
    assert model.blocks[0].attn.kv_cache_values_per_token() == 576
    assert 14.5e9 < build_on_meta("V2-Lite-like", "mla").num_params() < 16.5e9


def test_model_stats_prints_the_table(capsys):
    main()
    out = capsys.readouterr().out
    assert out.count("V3-like") == 3 and out.count("V2-Lite-like") == 3
    mla_row = next(line for line in out.splitlines() if line.startswith("V3-like") and " mla " in line)
    assert "576" in mla_row and "1.8%" in mla_row
