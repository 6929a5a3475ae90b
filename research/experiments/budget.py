"""Compute-matched arms: ``grid.budget`` gives every arm the same tokens, training FLOPs or GPU
seconds instead of the same steps, and each arm's ``trainer.max_steps`` follows from what one of its
steps costs.

    grid:
      budget: {flops: 3e15}        # or {tokens: 2e7}, or {gpu_seconds: 120}

- ``tokens``: steps = tokens / (batch x seq_len x accumulate); the same for every arm of one batch.
- ``flops``: steps = FLOPs / (FLOPs per token x tokens per step), with each arm's own training
  FLOPs per token (``Transformer.flops_per_token``): its MTP modules, MLA's projections and only the
  experts a token is routed to all count. At equal steps, MTP and MLA arms get more compute than
  the baseline; here they get the same.
- ``gpu_seconds``: steps = seconds x tokens/s / tokens per step, with tokens/s from a short timed
  probe of the arm on this machine's GPU (``research.training.probe``), warm-up excluded. The
  probes are kept in the grid's folder, so a relaunch gives every arm the steps it had.

Without ``grid.budget`` every arm trains ``trainer.max_steps``, as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from components.registry import require, spec_error
from research.config.build import model_config
from research.model.transformer import Transformer
from research.tracking import store
from research.training.data import tokenize_corpus

KINDS = ("tokens", "flops", "gpu_seconds")
ALLOWED = "one of {tokens: N}, {flops: N}, {gpu_seconds: N} (gpu_seconds may add probe_steps: N)"
PROBE_STEPS = 30  # timed steps of a gpu_seconds probe, after the trainer's warm-up steps


@dataclass(frozen=True)
class Budget:
    kind: str  # one of KINDS
    amount: float
    probe_steps: int = PROBE_STEPS

    def __str__(self) -> str:
        unit = {"tokens": "tokens", "flops": "training FLOPs", "gpu_seconds": "GPU seconds"}[self.kind]
        return f"{self.amount:.3g} {unit} per run"


def budget_of(cfg: DictConfig) -> Budget | None:
    """The grid's ``grid.budget``, checked; None for equal steps."""
    node = cfg.grid.get("budget")
    if node is None:
        return None
    spec = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    require(isinstance(spec, dict), "grid.budget", spec, ALLOWED)
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in (*KINDS, "probe_steps")]
    require(len(kinds) == 1 and not extra, "grid.budget", spec, ALLOWED)
    kind = kinds[0]
    amount = spec[kind]
    require(isinstance(amount, int | float) and amount > 0, f"grid.budget.{kind}", amount, "a number above 0")
    probe_steps = spec.get("probe_steps", PROBE_STEPS)
    require(kind == "gpu_seconds" or "probe_steps" not in spec, "grid.budget.probe_steps", probe_steps,
            "only with gpu_seconds")  # fmt: skip
    require(isinstance(probe_steps, int) and probe_steps > 0, "grid.budget.probe_steps", probe_steps,
            "a whole number above 0")  # fmt: skip
    return Budget(kind, float(amount), probe_steps)


def tokens_per_step(cfg: DictConfig) -> int:
    """Tokens one optimiser step trains on (``data.batch_size`` is the global batch)."""
    return int(cfg.data.batch_size) * int(cfg.data.seq_len) * int(cfg.trainer.accumulate)


def flops_per_token(cfg: DictConfig) -> float:
    """Training FLOPs per token of the model ``cfg`` describes, counted on the ``meta`` device."""
    vocab_size = tokenize_corpus(cfg.data, log=lambda _: None).vocab_size  # cached after the first
    with torch.device("meta"):
        model = Transformer(model_config(cfg, vocab_size))
    return model.flops_per_token(int(cfg.data.seq_len))


Probe = Callable[[DictConfig, int], float]  # (an arm's config, timed steps) -> tokens/s


def steps_for(budget: Budget, cfg: DictConfig, tokens_per_s: Probe | None = None) -> int:
    """The steps that spend ``budget`` on the arm ``cfg``: at least one, rounded to the nearest."""
    per_step = tokens_per_step(cfg)
    if budget.kind == "tokens":
        tokens = budget.amount
    elif budget.kind == "flops":
        tokens = budget.amount / flops_per_token(cfg)
    else:
        if tokens_per_s is None:
            raise ValueError("grid.budget.gpu_seconds needs a probe of each arm's tokens/s")
        tokens = budget.amount * tokens_per_s(cfg, budget.probe_steps)
    return max(1, round(tokens / per_step))


class ProbeCache:
    """The tokens/s each arm was probed at, in a JSON file keyed by the arm's config hash: a
    relaunch gives every arm the steps it had, so its finished runs are found again."""

    def __init__(self, path: Path, probe: Probe):
        self.path, self.probe = path, probe
        self.seen: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, cfg: DictConfig, steps: int) -> float:
        key = f"{store.config_hash(cfg)}/{steps}"
        if key not in self.seen:
            measured = self.probe(cfg, steps)
            require(math.isfinite(measured) and measured > 0, "grid.budget.gpu_seconds", "probe",
                    "a probe that measured tokens/s")  # fmt: skip
            self.seen[key] = measured
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.seen, indent=1))
        return self.seen[key]


def refuse_fixed_steps(overrides: list[str]) -> None:
    """A budget sets every arm's steps: an override that sets them too would be silently lost."""
    fixed = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == "trainer.max_steps"]
    if fixed:
        allowed = "no value while grid.budget sets each arm's steps (drop it, or grid.budget)"
        raise spec_error("trainer.max_steps", fixed[0].split("=", 1)[-1], allowed)
