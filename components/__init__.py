"""DeepSeek-V3's swappable parts as plain ``nn.Module``s: no Lightning, Hydra or MLflow inside.

Importing the package registers every component with its axis registry.
"""

from components import attention, balance, ffn, moe, mtp  # noqa: F401  (registration side effects)
from components.attention import ATTENTION
from components.balance import BALANCE, LoadBalance, max_violation
from components.ffn import FFN
from components.linear import LinearFactory, make_linear
from components.registry import Registry, spec_error

__all__ = [
    "ATTENTION",
    "BALANCE",
    "FFN",
    "LinearFactory",
    "LoadBalance",
    "Registry",
    "make_linear",
    "max_violation",
    "spec_error",
]
