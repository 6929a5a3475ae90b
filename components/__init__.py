"""DeepSeek-V3's swappable parts as plain ``nn.Module``s: no Lightning, Hydra or MLflow inside.

Each module registers its components with its axis registry when imported (``research.model.transformer``
imports them all). The package itself imports nothing, so ``components.registry`` stays light for
a CLI that only lists or checks; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ATTENTION": "components.attention",
    "BALANCE": "components.balance",
    "BalancePolicy": "components.balance",
    "build_balance": "components.balance",
    "max_violation": "components.balance",
    "FFN": "components.ffn",
    "LinearFactory": "components.linear",
    "make_linear": "components.linear",
    "Registry": "components.registry",
    "spec_error": "components.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'components' has no attribute {name!r}")
    for module in ("components.attention", "components.balance", "components.ffn", "components.moe",
                   "components.mtp"):  # fmt: skip
        importlib.import_module(module)  # every registry complete before any is handed out
    return getattr(importlib.import_module(_EXPORTS[name]), name)
