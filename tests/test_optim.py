"""MasterAdamW: bf16 weights trained through fp32 masters take AdamW's updates (the same numbers
as fp32 weights fed the same bf16 gradients), keep their masters through a checkpoint, and train a
model under Lightning like plain AdamW does; the Triton kernel against the torch reference."""

import lightning as L
import pytest
import torch
from torch import nn

from research.training import converters as speed
from research.training.module import LitLM
from research.training.optim import MasterAdamW
from tests.conftest import assert_ok_under_triton_interpreter, tiny_config

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _pair(seed: int = 0):
    """fp32 weights for torch's AdamW, and the same weights with the matrix stored in bf16 for
    MasterAdamW (the norm-like vector stays fp32 in both)."""
    g = torch.Generator().manual_seed(seed)
    matrix, vector = torch.randn(33, 17, generator=g), torch.randn(17, generator=g)
    ref = [nn.Parameter(matrix.clone()), nn.Parameter(vector.clone())]
    low = [nn.Parameter(matrix.bfloat16()), nn.Parameter(vector.clone())]
    return ref, low, {low[0]: matrix.clone()}


def _set_grads(ref, low, step):
    g = torch.Generator().manual_seed(100 + step)
    for r, w in zip(ref, low, strict=True):
        grad = torch.randn(r.shape, generator=g).bfloat16()  # what autocast's backward gives
        r.grad, w.grad = grad.float(), grad.to(w.dtype)


def _groups(params):
    return [{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0}]


def test_bf16_weights_take_adamws_updates_through_their_fp32_masters():
    ref, low, masters = _pair()
    reference = torch.optim.AdamW(_groups(ref), foreach=False, **HYPER)
    opt = MasterAdamW(_groups(low), masters, foreach=False, **HYPER)
    for step in range(6):
        for o in (reference, opt):  # a schedule: the lr changes every step
            for group in o.param_groups:
                group["lr"] = HYPER["lr"] / (step + 1)
        _set_grads(ref, low, step)
        if step % 2:  # clipped on every other step (the norm is ~25)
            want = torch.nn.utils.clip_grad_norm_(ref, 5.0)
            torch.testing.assert_close(opt.clip_grad_norm_(5.0), want, rtol=1e-6, atol=0)
        reference.step()
        opt.step()
    master = opt.state[low[0]]["master"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, ref[0].detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(low[0].detach(), master.bfloat16())  # the stored weight: its master, rounded
    assert torch.equal(low[1].detach(), ref[1].detach())  # fp32 weights: AdamW's own path
    assert low[0].grad is not None and low[1].grad is not None  # grads left for zero_grad
    assert torch.equal(opt.master_of(low[0]), master) and opt.master_of(low[1]) is low[1]


def test_the_masters_start_from_the_weights_fp32_values_and_survive_a_state_dict():
    ref, low, masters = _pair()
    opt = MasterAdamW(_groups(low), masters, **HYPER)
    assert torch.equal(opt.master_of(low[0]), masters[low[0]])  # before any step: the fp32 original
    _set_grads(ref, low, 0)
    opt.step()
    saved = opt.state_dict()

    _, again, _ = _pair()
    with torch.no_grad():
        for a, b in zip(again, low, strict=True):
            a.copy_(b)
    stale = {again[0]: torch.zeros(33, 17)}  # a fresh run's initial master: the checkpoint's wins
    restored = MasterAdamW(_groups(again), stale, **HYPER)
    restored.load_state_dict(saved)
    assert not restored._initial_masters  # and the stale one is let go (a resume holds no copy)
    state = restored.state[again[0]]
    for key in ("master", "exp_avg", "exp_avg_sq"):  # torch would have cast these to bf16
        assert state[key].dtype == torch.float32 and torch.equal(state[key], opt.state[low[0]][key])
    for o, params in ((opt, low), (restored, again)):
        _set_grads(ref, params, 1)
        o.step()
    assert torch.equal(restored.state[again[0]]["master"], opt.state[low[0]]["master"])


def test_unsupported_adamw_options_are_refused_by_name():
    with pytest.raises(ValueError, match=r"MasterAdamW amsgrad=True .*allowed: false"):
        MasterAdamW([nn.Parameter(torch.zeros(2))], amsgrad=True)


def test_the_triton_kernel_matches_the_reference_in_the_interpreter():
    assert_ok_under_triton_interpreter("tests.adamw_triton_interpreted")


# --- the option in training ------------------------------------------------------------------------

OPTIM = {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "warmup_steps": 2,
         "total_steps": 12, "min_lr_ratio": 0.1}  # fmt: skip


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, setting, max_steps: int, resume=None, checkpoint_at: int | None = None, clip=None):
    torch.manual_seed(0)
    module = LitLM(tiny_config(ffn="moe", balance="aux_free"), OPTIM, torch.ones(64),
                   speed_options={"bf16_expert_weights": setting})  # fmt: skip
    losses = Losses()
    callbacks = [losses]
    if checkpoint_at:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=checkpoint_at,
                                                             save_top_k=-1))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=max_steps, logger=False,
                        enable_checkpointing=bool(checkpoint_at), enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=clip, callbacks=callbacks)  # fmt: skip
    # 6 batches an epoch: a checkpoint at step 6 resumes at the start of the second
    tokens = torch.randint(0, 64, (12, 17), generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(tokens, batch_size=2)
    trainer.fit(module, data, ckpt_path=resume, weights_only=True)
    return module, losses.losses


def test_training_with_bf16_expert_weights_follows_fp32_weights_and_resumes_exactly(tmp_path):
    plain, plain_losses = _fit(tmp_path / "plain", False, 12)
    module, losses = _fit(tmp_path / "bf16", True, 12)
    experts = module.model.blocks[1].ffn.experts
    assert experts.w_gate_up.dtype == experts.w_down.dtype == torch.bfloat16
    # Autocast casts an fp32 weight to bf16 for its GEMM and its gradient comes back bf16: stored
    # in bf16 with an fp32 master, the same training to the bit.
    assert losses == plain_losses
    master = module.trainer.optimizers[0].master_of(experts.w_down)
    torch.testing.assert_close(master, plain.model.blocks[1].ffn.experts.w_down.detach(), rtol=0, atol=0)
    # Clipped (the norm is taken in fp32 and the bf16 gradients scaled in the step, checked against
    # clip_grad_norm_ above; its summation order differs in the last fp32 bit, which bf16 autocast
    # then amplifies, so the clipped runs are not compared to the bit). The checkpoint holds fp32
    # masters, as a plain run's would; resuming from it repeats the rest exactly.
    _, clipped = _fit(tmp_path / "clipped", True, 12, checkpoint_at=6, clip=1.0)
    assert clipped != losses  # the clip acts
    checkpoint = torch.load(tmp_path / "clipped" / "epoch=0-step=6.ckpt", weights_only=True)
    saved = checkpoint["state_dict"]["model.blocks.1.ffn.experts.w_down"]
    assert saved.dtype == torch.float32 and not torch.equal(saved, saved.bfloat16().float())
    resume = tmp_path / "clipped" / "epoch=0-step=6.ckpt"
    _, resumed = _fit(tmp_path / "resumed", True, 12, resume=resume, clip=1.0)
    assert resumed == clipped[6:]


def test_bf16_expert_weights_resolve_per_device_and_refuse_what_they_cannot_keep():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    moe, dense = (
        LitLM(tiny_config(ffn="moe"), {}, torch.ones(64)).model,
        LitLM(tiny_config(), {}, torch.ones(64)).model,
    )
    on = dict(precision="bf16-mixed", single_process=True, accumulate=1)
    assert speed.bf16_expert_weights_enabled("auto", gpu, moe, **on)
    assert not speed.bf16_expert_weights_enabled("auto", cpu, moe, **on)
    assert not speed.bf16_expert_weights_enabled("auto", gpu, dense, **on)  # no experts
    assert speed.bf16_expert_weights_enabled(True, cpu, moe, **on)
    for change, message in (({"precision": "32-true"}, "unless precision is bf16"),
                            ({"single_process": False}, "with several processes"),
                            ({"accumulate": 4}, r"with trainer\.accumulate above 1")):  # fmt: skip
        assert not speed.bf16_expert_weights_enabled("auto", gpu, moe, **{**on, **change})
        with pytest.raises(ValueError, match=rf"trainer\.bf16_expert_weights=True .*false or auto {message}"):
            speed.bf16_expert_weights_enabled(True, gpu, moe, **{**on, **change})
    with pytest.raises(ValueError, match=r"trainer\.bf16_expert_weights='yes' .*auto, true, false"):
        speed.bf16_expert_weights_enabled("yes", gpu, moe, **on)
