"""``trainer.strategy`` -> a Lightning strategy; the Slurm environment with requeue left to us.

Lightning's ``SLURMEnvironment`` reads the ranks and nodes that ``srun`` started (one task per
GPU), and by default also installs its own requeue handler on SIGUSR1. That handler saves a
checkpoint from inside the signal, wherever the step happens to be (mid optimiser update, or with
other ranks waiting in an all-reduce), so the requeue is owned by ``research.training.preemption`` instead,
which acts at the next step boundary with every rank agreeing; Lightning's is switched off here.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy

from components.registry import require
from research.model.transformer import Block

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


def make_strategy(t: Any) -> str | Strategy:
    """The strategy named by the ``trainer`` config node."""
    name = t.get("strategy", "auto")
    require(name in STRATEGIES, "trainer.strategy", name, ", ".join(STRATEGIES))
    if name == "auto":
        return "auto"
    if name == "ddp":
        # Every parameter gets a gradient each step (all experts run in one grouped GEMM), so DDP
        # need not search for unused ones.
        return DDPStrategy(gradient_as_bucket_view=True)
    if name == "fsdp":
        sharding = t.get("sharding", "FULL_SHARD")
        require(sharding in FSDP_SHARDING, "trainer.sharding", sharding, ", ".join(FSDP_SHARDING))
        # Original parameters stay visible, so the optimiser groups (decay, experts) see real tensors.
        return FSDPStrategy(sharding_strategy=sharding, auto_wrap_policy={Block}, state_dict_type="full",
                            use_orig_params=True)  # fmt: skip
    stage = t.get("zero_stage", 2)
    require(stage in (1, 2, 3), "trainer.zero_stage", stage, "1, 2, 3")
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "trainer.strategy=deepspeed needs DeepSpeed: pip install 'dsv3-ablate[deepspeed]'"
        ) from e
    # The micro-batch size only feeds DeepSpeed's throughput log; its guess reads a sampler we do not use.
    return DeepSpeedStrategy(stage=stage, logging_batch_size_per_gpu=1)


def cluster_plugins() -> list[Any]:
    """Under Slurm: its environment, without Lightning's own requeue handler."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
