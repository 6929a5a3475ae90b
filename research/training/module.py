"""The LightningModule: losses, the optimiser and its schedule, validation in bits per byte."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from components.linear import LinearFactory, make_linear
from components.moe import GroupedExperts
from research import metrics as M
from research.model.transformer import ModelConfig, Transformer
from research.training import converters
from research.training.callbacks import log_evaluation
from research.training.optim import MasterAdamW


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def unwrapped_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP and torch.compile insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "")


class LitLM(L.LightningModule):
    def __init__(self, model_cfg: ModelConfig, optim: dict[str, Any], token_bytes: torch.Tensor,
                 linear: LinearFactory = make_linear, speed_options: dict | None = None):  # fmt: skip
        super().__init__()
        self.model = Transformer(model_cfg, linear)
        self.optim = dict(optim)
        # The converters' options (research.training.converters), applied once the device is known.
        self.speed_options = {**converters.PLAIN, **(speed_options or {})}
        self._configured = self._cuda_graphs = False
        self._bf16_weights = False  # some weights stored in bf16 (trainer.bf16_expert_weights)
        # their fp32 originals, until configure_optimizers hands them to MasterAdamW as its masters
        self._masters: dict[torch.nn.Parameter, torch.Tensor] = {}
        # Optimiser group of every parameter, decided here on the plain model: once FSDP shards it,
        # shapes no longer tell a matrix from a norm. Routed experts get a group of their own
        # (sharding strategies such as DeepSpeed's MoE path key on it); norms are not decayed.
        experts = {
            id(p) for m in self.model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
        }
        self.optim_group_of = {
            name: "experts" if id(p) in experts else "dense" if p.dim() >= 2 else "no_decay"
            for name, p in self.model.named_parameters()
        }
        # bytes of text per token id, for bits per byte
        self.register_buffer(
            "token_bytes", torch.as_tensor(token_bytes, dtype=torch.float64), persistent=False
        )

    def configure_model(self) -> None:
        # Here, not in __init__: "auto" needs the device, known once the strategy is set up.
        # Lightning calls this again for a validate after fit: once is enough.
        if self._configured:
            return
        trainer = self.trainer
        target = converters.Target(trainer.strategy.root_device, self._sharded(), trainer.world_size > 1,
                                   trainer.precision, trainer.accumulate_grad_batches)  # fmt: skip
        done = converters.convert(self.model, self.speed_options, target)
        self._masters, self._cuda_graphs = done.masters, done.cuda_graphs
        self._bf16_weights = "bf16_expert_weights" in done.applied
        self._configured = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Weights stored in bf16 are saved as their fp32 masters: a checkpoint is the same whichever
        # way it was trained (and a resume loads the masters back from the optimiser's state).
        if self._bf16_weights:
            optimizer = self.trainer.optimizers[0]
            for name, p in self.named_parameters():
                if p.dtype != torch.float32:
                    checkpoint["state_dict"][name] = optimizer.master_of(p).detach().clone()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._cuda_graphs:  # a new step: the graphs may overwrite the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _sharded(self) -> bool:
        """Whether a sharding strategy's wrappers own the parameters (FSDP, DeepSpeed)."""
        return isinstance(self.trainer.strategy, FSDPStrategy | DeepSpeedStrategy)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.model(batch[:, :-1], batch[:, 1:])
        self.log(M.TRAIN_LOSS, out.loss, prog_bar=True)
        self.log(M.TRAIN_LM_LOSS, out.lm_loss)
        if out.mtp_loss is not None:
            self.log(M.TRAIN_MTP_LOSS, out.mtp_loss)
        if out.balance_loss is not None:
            self.log(M.TRAIN_BALANCE_LOSS, out.balance_loss)
        return out.loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # The aux-loss-free bias moves after the weights, from the load the step was computed on.
        self.model.update_balance_bias()

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        targets = batch[:, 1:]
        out = self.model(batch[:, :-1], targets)
        n = targets.numel()
        self._val_sums[0] += out.lm_loss.double() * n
        self._val_sums[1] += n
        self._val_sums[2] += self.token_bytes[targets].sum()

    def on_validation_epoch_end(self) -> None:
        nats, tokens, n_bytes = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        log_evaluation(self, {M.VAL_LOSS: nats / tokens, M.VAL_BPB: nats / math.log(2) / n_bytes})

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        if gradient_clip_val and self._bf16_weights:
            optimizer.clip_grad_norm_(gradient_clip_val)  # bf16 gradients scaled in fp32 by the step
            return
        if gradient_clip_val and getattr(optimizer, "defaults", {}).get("fused"):
            # Lightning refuses to clip for a fused optimizer, which could unscale fp16 gradients
            # itself; precisions here are fp32 and bf16, with nothing to unscale.
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision refuses to clip by norm; FSDP itself computes the norm over
            # every shard.
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        named = [(unwrapped_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"name": g, "params": [p for n, p in named if self.optim_group_of[n] == g],
                   "weight_decay": 0.0 if g == "no_decay" else o["weight_decay"]}
                  for g in ("dense", "experts", "no_decay")]  # fmt: skip
        groups = [g for g in groups if g["params"]]
        # Fused (the whole update in one kernel per group) on a GPU without a sharding strategy,
        # whose wrappers own the parameters; elsewhere the default multi-tensor kernels.
        fused = self.device.type == "cuda" and not self._sharded()
        # The optimiser alone holds the masters: after a resume it loads them from the checkpoint,
        # and the initial ones must not stay alive here.
        masters, self._masters = self._masters, {}
        opt = MasterAdamW(groups, masters, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o["warmup_steps"], o["total_steps"], o["min_lr_ratio"])
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
