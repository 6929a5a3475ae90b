"""Speed options change the speed, not the numbers: the fused head + cross-entropy against the
plain path, per-block compilation against eager, and how the trainer settings resolve."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from components.loss import chunk_for, linear_cross_entropy
from research import speed
from research.model import Transformer
from research.module import LitLM
from tests.conftest import tiny_config


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [8, 37, 100])  # ragged, one exact chunk, bigger than N
def test_fused_cross_entropy_matches_the_plain_one_in_fp32(chunk):
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20]] = -100  # ignored tokens count in neither the sum nor the mean
    want = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    got = linear_cross_entropy(h, w, targets, chunk)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, r in zip(_grads(got * 3, h, w), _grads(want * 3, h, w), strict=True):  # upstream scale kept
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_under_autocast_follows_the_plain_path():
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(96, 32, requires_grad=True)
    targets = torch.randint(0, 96, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), targets)
        got = linear_cross_entropy(h, w, targets, 24)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the same bf16 logits, fp32 softmax
    for g, r in zip(_grads(got, h, w), _grads(want, h, w), strict=True):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)  # bf16 GEMMs; dW summed per chunk


def test_fused_loss_keeps_no_logits_for_the_backward():
    """The point of fusing: nothing of the logits' size is saved for the backward."""
    model = Transformer(tiny_config("mha", "dense", vocab_size=512)).train()
    model.loss_chunk = 16
    idx = torch.randint(0, 512, (2, 24))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = model(idx, idx)
    assert out.logits is None and max(saved) < 2 * 24 * 512
    saved.clear()
    model.loss_chunk = 0
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(idx, idx)
    assert max(saved) >= 2 * 24 * 512  # the plain path does keep them: the check can fail


def _twins(cfg):
    """Two models with the same weights."""
    a, b = Transformer(cfg).train(), Transformer(cfg).train()
    b.load_state_dict(a.state_dict())
    return a, b


def _assert_same_step(reference: Transformer, other: Transformer) -> None:
    """The same losses and the same gradients on one batch."""
    idx = torch.randint(0, 64, (2, 12))
    a, b = reference(idx, torch.roll(idx, -1, 1)), other(idx, torch.roll(idx, -1, 1))
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    if a.mtp_loss is not None:
        torch.testing.assert_close(b.mtp_loss, a.mtp_loss, rtol=1e-6, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("attention", "ffn", "mtp_depth"), [("mha", "dense", 0), ("mla", "moe", 2)])
def test_fused_loss_trains_the_model_the_same(attention, ffn, mtp_depth):
    plain, fused = _twins(tiny_config(attention, ffn, "aux_free", mtp_depth))
    fused.loss_chunk = 7
    _assert_same_step(plain, fused)


def test_chunk_bounds_the_logits_memory():
    assert chunk_for(32000) == 2**29 // (4 * 32000)
    assert chunk_for(10**12) == 1


def _counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_compiled_blocks_compute_what_eager_does():
    eager, compiled = _twins(tiny_config("mla", "moe", "aux_free", 1))
    names = list(compiled.state_dict())
    graphs = []
    speed.compile_blocks(compiled, backend=_counting_backend(graphs))
    _assert_same_step(eager, compiled)
    assert graphs, "nothing went through torch.compile"
    assert list(compiled.state_dict()) == names  # checkpoints load either way


def test_auto_means_a_gpu_and_no_sharding():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not speed.enabled("compile", "auto", cpu)
    assert speed.enabled("compile", "auto", gpu)
    assert not speed.enabled("compile", "auto", gpu, sharded=True)
    assert speed.enabled("compile", True, cpu) and not speed.enabled("compile", False, gpu)
    with pytest.raises(ValueError, match=r"trainer\.fused_loss.*auto, true, false"):
        speed.enabled("fused_loss", "yes", cpu)
    with pytest.raises(ValueError, match=r"trainer\.fused_loss"):
        speed.fuse_loss(Transformer(tiny_config()), sharded=True)


@pytest.mark.parametrize(("device", "applied"), [("cpu", False), ("cuda", True)])
def test_the_module_applies_the_options_once_the_device_is_known(device, applied):
    module = LitLM(tiny_config(), {}, torch.ones(64), speed_options={"compile": "auto", "fused_loss": "auto"})
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    module.configure_model()
    block = module.model.blocks[0]
    assert (block._compiled_call_impl is not None) == applied
    assert (module.model.loss_chunk > 0) == applied
    module.model.loss_chunk = -1
    module.configure_model()  # again, as Lightning does for a validate after fit: nothing changes
    assert module.model.loss_chunk == -1
