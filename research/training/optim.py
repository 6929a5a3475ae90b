"""AdamW over a model some of whose weights are stored in bf16, each with an fp32 master copy in the
optimiser's state (``trainer.bf16_expert_weights``).

Under bf16 autocast an fp32 weight is cast to bf16 for its matmul in every forward, and its bf16
gradient cast back to fp32 in every backward: two passes over the weight per step that do no
arithmetic. For the routed experts, which hold most of a MoE model's weights but few of its FLOPs,
those passes are a measurable part of a step (``bench/throughput.py`` times it). Stored in bf16,
the weight feeds its GEMM as it is and collects a bf16 gradient; the update reads that gradient, updates
the fp32 master and moments, and writes the new bf16 weight, in one pass (a Triton kernel on a GPU).

The arithmetic is ``torch.optim.AdamW``'s, on the master: the same updates as fp32 weights with the
bf16 gradients autocast gives them, up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from components.registry import require
from research.training.adamw_step import StepScalars, adamw_master_update_reference


class MasterAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose bf16 parameters are updated through fp32 masters.

    ``masters`` maps a bf16 parameter to the fp32 tensor it was stored from (its master until the
    first step; a parameter missing there starts from its bf16 values). fp32 parameters take
    AdamW's own kernels (``fused`` etc. as usual)."""

    def __init__(
        self, params: Iterable, masters: dict[nn.Parameter, torch.Tensor] | None = None, **kwargs: Any
    ):
        super().__init__(params, **kwargs)
        for option in ("amsgrad", "maximize", "capturable", "differentiable"):
            require(not self.defaults[option], f"MasterAdamW {option}", True, "false")
        self._initial_masters = dict(masters or {})
        self._grad_scale: torch.Tensor | None = None  # clip_grad_norm_'s, for the bf16 gradients

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:  # Lightning passes forward and backward as the closure
            with torch.enable_grad():
                loss = closure()
        low = [(group, p) for group in self.param_groups for p in group["params"]
               if p.grad is not None and p.dtype != torch.float32]  # fmt: skip
        grads = [p.grad for _, p in low]
        # AdamW's own step sees the fp32 parameters only: it skips those without a gradient.
        for _, p in low:
            p.grad = None
        try:
            super().step()
        finally:
            for (_, p), grad in zip(low, grads, strict=True):
                p.grad = grad
        for group, p in low:
            self._update(p, group)
        self._grad_scale = None
        return loss

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over every gradient, the bf16 ones' norms taken in
        fp32 and their scaling left to the next step, which applies it in fp32: scaled in place, a
        bf16 gradient would be rounded again, where an fp32 weight's gradient is not."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        high = [p for p in params if p.dtype == torch.float32]
        norms = [
            torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.dtype != torch.float32
        ]
        if high:
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in high]))
        if not norms:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack(norms))
        torch.nn.utils.clip_grads_with_norm_(high, max_norm, total)
        self._grad_scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grad_norm_'s
        return total

    def _update(self, p: nn.Parameter, group: dict) -> None:
        state = self.state[p]
        if not state:
            master = self._initial_masters.pop(p, p)
            state["step"] = torch.tensor(0.0)
            state["master"] = master.detach().to(device=p.device, dtype=torch.float32, copy=master is p)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        tensors = (p, state["master"], p.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"])
        scalars = StepScalars.of(group, state["step"].item())  # a CPU tensor: no device sync
        if p.is_cuda:  # Triton exists only where a GPU does: imported there
            from research.training.adamw_triton import adamw_master_update

            adamw_master_update(*tensors, self._grad_scale, scalars)
        else:
            adamw_master_update_reference(*tensors, self._grad_scale, scalars)

    def master_of(self, p: nn.Parameter) -> torch.Tensor:
        """The fp32 weight behind ``p`` (``p`` itself for an fp32 parameter): what a checkpoint saves."""
        if p.dtype == torch.float32:
            return p
        state = self.state.get(p)
        if state and "master" in state:
            return state["master"]
        return self._initial_masters.get(p, p).float()

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to its parameter's dtype; a bf16 parameter's
        # master and moments must stay fp32.
        saved = state_dict["state"]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        keep = {
            p: {k: v for k, v in saved[i].items() if k != "step"}
            for i, p in zip(saved_ids, params, strict=False)  # torch checks the lengths
            if p.dtype != torch.float32 and i in saved
        }
        super().load_state_dict(state_dict)
        for p, tensors in keep.items():
            self._initial_masters.pop(p, None)  # superseded by the checkpoint's: free them
            for key, value in tensors.items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
            self.state[p]["step"] = self.state[p]["step"].cpu().float()
            self.state[p].setdefault("master", p.detach().float())  # saved without masters: from p
