"""Expert load balancing for DeepSeekMoE, as rules a policy composes.

The MoE layer asks its ``BalancePolicy`` for a loss on each training forward and, after each
optimiser step, lets it move the layer's selection bias. ``balance.name`` is a rule or a
``+``-joined list of them (``aux_free+seq_aux``); every other key of the spec goes to the rules
whose builders take it. Each module in this folder registers one rule, and all are loaded here, so
adding a rule is adding a file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any

import torch

from components.balance.rule import BALANCE, BalancePolicy, BalanceRule, Routing
from components.registry import spec_error

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BALANCE", "BalancePolicy", "BalanceRule", "Routing", "build_balance", "max_violation"]


def build_balance(spec: Mapping[str, Any]) -> BalancePolicy:
    """``{"name": "aux_free+seq_aux", "gamma": 1e-3, "alpha": 1e-4}`` -> a policy of two rules."""
    spec = dict(spec)
    name = spec.pop("name", None)
    allowed = f"none, or one or more of {', '.join(BALANCE.names())} joined by '+'"
    if not isinstance(name, str) or not name:
        raise spec_error("balance.name", name, allowed)
    if name == "none":
        names: list[str] = []
    else:
        names = name.split("+")
        if any(n not in BALANCE.names() for n in names) or len(set(names)) < len(names):
            raise spec_error("balance.name", name, allowed)
    keys = {n: list(inspect.signature(BALANCE.builder(n)).parameters) for n in names}
    taken = sorted({k for ks in keys.values() for k in ks})
    for key, value in spec.items():
        if key not in taken:
            raise spec_error(f"balance.{key}", value, f"keys of {name!r}: {', '.join(taken) or 'none'}")
    rules = [BALANCE.builder(n)(**{k: v for k, v in spec.items() if k in keys[n]}) for n in names]
    return BalancePolicy(tuple(rules))


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load; 0 for an idle layer."""
    load = load.float()
    mean = load.mean()
    return 0.0 if mean <= 0 else float((load.max() - mean) / mean)
