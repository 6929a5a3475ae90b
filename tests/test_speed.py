"""Speed options change the speed, not the numbers: the fused head + cross-entropy against the
plain path, per-block compilation against eager, how the trainer settings resolve, and the
callbacks that now read GPU values only every few steps."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import sdpa_kernel

import components.attention
from components.loss import chunk_for, cross_entropy_chunk, linear_cross_entropy
from research import metrics as M
from research.errors import TrainingDiverged
from research.model.transformer import Transformer
from research.training import converters as speed
from research.training.callbacks import DivergenceGuard, PerfMonitor
from research.training.module import LitLM
from tests.conftest import ATTENTION_SPECS, tiny_config


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


MLA_NO_Q = {**ATTENTION_SPECS["mla"], "q_lora_rank": 0}  # the queries straight from x


@pytest.mark.parametrize(
    ("attention", "ffn", "stacked_per_block"),
    [("mha", "dense", 3 + 2), ("gqa", "moe", 3 + 2), ("mla", "moe", 2 + 2), (MLA_NO_Q, "dense", 2 + 2)],
)  # projections of one input per block: attention's, and SwiGLU's gate and up (a shared expert's)
def test_stacked_projections_train_the_model_the_same(attention, ffn, stacked_per_block):
    plain, stacked = _twins(tiny_config(attention, ffn, "aux_free", 1))
    speed.stack_projections(stacked)
    calls = []  # the model of each forward of a Linear module
    for name, model in (("plain", plain), ("stacked", stacked)):
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda *_, name=name: calls.append(name))
    _assert_same_step(plain, stacked)
    blocks = len(plain.blocks) + len(plain.mtp)
    assert calls.count("plain") - calls.count("stacked") == blocks * stacked_per_block  # ran stacked


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


def test_each_compiled_model_of_a_process_gets_compiled_code_not_a_silent_eager_fallback():
    """As in a sweep worker: one architecture after another, each compiled in the same process."""
    graphs = []
    for width in range(32, 32 + 8 * 6, 8):  # six widths: past torch.compile's recompile limit of 8
        model = Transformer(tiny_config("mla", "moe", "aux_free", d_model=width))
        speed.compile_blocks(model, backend=_counting_backend(graphs))
        before = len(graphs)
        idx = torch.randint(0, 64, (2, 12))
        model(idx, idx).loss.backward()
        assert len(graphs) > before, f"d_model={width}: the blocks ran eager"


@pytest.mark.parametrize("kernel", ["flash", "math"])  # the two SDPA has on a CPU
@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_a_pinned_attention_kernel_trains_the_model_the_same(attention, kernel, monkeypatch):
    entered = []  # the kernels each attention call pins SDPA to

    def spy(backends):
        entered.append(backends)
        return sdpa_kernel(backends)

    monkeypatch.setattr(components.attention, "sdpa_kernel", spy)
    auto, pinned = _twins(tiny_config(attention, "dense"))
    speed.pin_attention_kernel(pinned, kernel, torch.device("cpu"))
    _assert_same_step(auto, pinned)  # MLA's v is narrower than q/k: flash takes it only padded
    assert entered and set(entered) == {speed.ATTENTION_KERNELS[kernel]}  # the pinned model's only


def test_a_pinned_kernel_compiles_without_a_graph_break():
    model = Transformer(tiny_config("mla", "dense"))
    speed.pin_attention_kernel(model, "math", torch.device("cpu"))
    graphs = []
    attn = torch.compile(model.blocks[0].attn, backend=_counting_backend(graphs), fullgraph=True)
    attn(torch.randn(1, 5, 32), torch.arange(5))
    assert len(graphs) == 1


def test_attention_kernel_errors_name_the_key_and_the_choices():
    model = Transformer(tiny_config())
    with pytest.raises(ValueError, match=r"trainer\.attention_kernel.*auto, flash, cudnn, efficient, math"):
        speed.pin_attention_kernel(model, "flash3", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"trainer\.attention_kernel.*need a CUDA GPU"):
        speed.pin_attention_kernel(model, "cudnn", torch.device("cpu"))


def test_the_fused_loss_chunk_compiles_whole_and_computes_the_same():
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20]] = -100
    graphs = []
    compiled = torch.compile(cross_entropy_chunk, backend=_counting_backend(graphs), fullgraph=True)
    want, got = linear_cross_entropy(h, w, targets, 8), linear_cross_entropy(h, w, targets, 8, compiled)
    assert graphs, "the chunk did not go through torch.compile"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, r in zip(_grads(got, h, w), _grads(want, h, w), strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_compiled_blocks_with_the_fused_loss_train_the_model_the_same():
    plain, fast = _twins(tiny_config("mha", "moe", "aux_free", 1))
    graphs = []
    speed.fuse_loss(fast)
    speed.compile_blocks(fast, backend=_counting_backend(graphs))
    assert fast.loss_chunk_fn is not cross_entropy_chunk  # the loss's chunk maths compiled too
    _assert_same_step(plain, fast)


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
def test_the_module_applies_the_options_once_the_device_is_known(device, applied, monkeypatch):
    modes = []  # torch.compile's mode for each thing compiled

    def spy(fn, **options):
        modes.append(options.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    options = {"compile": "auto", "cuda_graphs": "auto", "fused_loss": "auto", "bf16_expert_weights": "auto"}
    module = LitLM(tiny_config(ffn="moe"), {}, torch.ones(64), speed_options=options)
    module._trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)),
        world_size=1,
        precision="bf16-mixed",
        accumulate_grad_batches=1,
    )
    module.configure_model()
    block = module.model.blocks[0]
    experts = module.model.blocks[1].ffn.experts
    assert experts.w_down.dtype == (torch.bfloat16 if applied else torch.float32)
    assert set(module._masters) == ({experts.w_gate_up, experts.w_down} if applied else set())
    assert module._bf16_weights == applied
    assert (block._compiled_call_impl is not None) == applied
    assert (module.model.loss_chunk > 0) == applied
    # on a GPU the blocks replay as CUDA graphs; the loss's chunk maths runs between them
    assert modes == (["reduce-overhead"] * len(module.model.blocks) + [None] if applied else [])
    assert module._cuda_graphs == applied
    assert block.attn.stacked == block.ffn.stacked == applied  # compiled: projections stacked too
    module.model.loss_chunk = -1
    module.configure_model()  # again, as Lightning does for a validate after fit: nothing changes
    assert module.model.loss_chunk == -1


# --- the callbacks read GPU values only on logging / check steps (each read waits for the GPU) ---


def _trainer(step: int, log_every: int = 3):
    return SimpleNamespace(global_step=step, log_every_n_steps=log_every, world_size=1)


def test_divergence_guard_reports_the_first_bad_step_at_its_next_check():
    guard = DivergenceGuard(check_every=4)
    losses = {1: 2.0, 2: 1.9, 3: 1.8, 4: 1.7, 5: 1.6, 6: float("nan"), 7: float("inf")}
    for step, loss in losses.items():  # step 4 is checked and finite; 5-7 are not checked
        guard.on_train_batch_end(_trainer(step), None, {"loss": torch.tensor(loss)})
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at step 6$"):
        guard.on_train_batch_end(_trainer(8), None, {"loss": torch.tensor(1.0)})


def test_perf_monitor_logs_each_window_on_logging_steps(monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 5.0, 6.0, 10.0])  # a reading at the warm-up step and each log step
    monkeypatch.setattr("research.training.callbacks.time.perf_counter", lambda: next(clock))
    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda v: logged.append(v),
                             model=SimpleNamespace(flops_per_token=lambda seq: 1.0))  # fmt: skip
    monitor = PerfMonitor(warmup_steps=1, seq_len=4)
    monitor.setup(None, module, "fit")
    batch = torch.zeros(2, 5, dtype=torch.long)  # 8 tokens per step
    for step in range(1, 8):
        monitor.on_train_batch_end(_trainer(step), module, None, batch, step)
    # the window starts after step 1 (clock 0); logs at steps 3 (clock 1) and 6 (clock 4)
    assert [round(v[M.STEP_MS]) for v in logged] == [500, 1000]  # 2 steps in 1 s, 3 steps in 3 s
    assert logged[-1][M.TOKENS_PER_S] == 40 / 4


def test_cuda_graphs_need_compiled_blocks_on_one_gpu(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert speed.cuda_graphs_enabled("auto", gpu, compiled=True, distributed=False)
    assert not speed.cuda_graphs_enabled("auto", gpu, compiled=False, distributed=False)
    assert not speed.cuda_graphs_enabled("auto", gpu, compiled=True, distributed=True)
    assert not speed.cuda_graphs_enabled("auto", cpu, compiled=True, distributed=False)
    monkeypatch.setattr(torch.version, "hip", "7.0")  # a ROCm build: auto leaves them off
    assert not speed.cuda_graphs_enabled("auto", gpu, compiled=True, distributed=False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert speed.cuda_graphs_enabled(True, gpu, compiled=True, distributed=True)  # asked for: on
    assert not speed.cuda_graphs_enabled(False, gpu, compiled=True, distributed=False)
    with pytest.raises(ValueError, match=r"trainer\.cuda_graphs.*while trainer\.compile is off"):
        speed.cuda_graphs_enabled(True, gpu, compiled=False, distributed=False)
    with pytest.raises(ValueError, match=r"trainer\.cuda_graphs.*needs a CUDA GPU"):
        speed.cuda_graphs_enabled(True, cpu, compiled=True, distributed=False)
    with pytest.raises(ValueError, match=r"trainer\.cuda_graphs.*auto, true, false"):
        speed.cuda_graphs_enabled("on", gpu, compiled=True, distributed=False)


@pytest.mark.parametrize("graphs", [False, True])
def test_each_batch_marks_a_new_cuda_graph_step_when_graphs_are_on(graphs, monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    module = LitLM(tiny_config(), {}, torch.ones(64))
    module._cuda_graphs = graphs
    module.on_train_batch_start(None, 0)
    module.on_validation_batch_start(None, 0)
    assert len(marks) == (2 if graphs else 0)


def test_the_options_defaults_are_the_trainer_configs_and_stated_there_only():
    from research.config.compose import compose_run

    assert speed.options_of(compose_run([]).trainer) == dict.fromkeys(speed.PLAIN, "auto")
    with pytest.raises(Exception, match="fused_loss"):  # a config without the key: not a silent default
        speed.options_of(OmegaConf.create({"compile": "auto", "cuda_graphs": "auto"}))


def test_a_deterministic_run_is_not_compiled_unless_asked():
    t = OmegaConf.create(
        {
            "compile": "auto",
            "cuda_graphs": False,
            "fused_loss": "auto",
            "bf16_expert_weights": False,
            "attention_kernel": "auto",
            "deterministic": True,
        }
    )
    want = {"compile": False, "cuda_graphs": False, "fused_loss": "auto", "bf16_expert_weights": False,
            "attention_kernel": "auto"}  # fmt: skip
    assert speed.options_of(t) == want
    t.compile = True
    assert speed.options_of(t)["compile"] is True
    t.deterministic, t.compile = False, "auto"
    assert speed.options_of(t)["compile"] == "auto"


def test_a_fused_optimizer_is_clipped_by_the_module_itself():
    """Lightning refuses to clip for fused optimizers; the module clips them (by the global norm)."""
    module = LitLM(tiny_config(), {}, torch.ones(64))
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt = torch.optim.AdamW(module.parameters(), fused=True)
    module.configure_gradient_clipping(opt, 1.0, "norm")
    norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()])
    assert abs(float(torch.linalg.vector_norm(norms)) - 1.0) < 1e-4
