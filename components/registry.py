"""Name -> builder registries, and the one error type for a bad spec.

A spec is a plain mapping such as ``{"name": "mla", "n_heads": 8, "kv_lora_rank": 64}``: exactly what
a Hydra config group yields. The registry picks the builder by ``name`` and checks every other key
against the builder's signature, so a typo fails at build time with the allowed keys in the message
instead of being silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def spec_error(key: str, value: Any, allowed: str | Iterable[Any]) -> ValueError:
    """A one-line ValueError naming the offending key, its value and what would be accepted."""
    if not isinstance(allowed, str):
        allowed = ", ".join(repr(a) for a in allowed)
    return ValueError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``spec_error`` unless ``ok``: the idiom every component uses to validate its settings."""
    if not ok:
        raise spec_error(key, value, allowed)


class Registry:
    """Maps names to builders for one swappable axis (``attention``, ``ffn``, ``balance``)."""

    def __init__(self, axis: str):
        self.axis = axis
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.axis}: {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._builders)

    def builder(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise spec_error(f"{self.axis}.name", name, self.names())
        return self._builders[name]

    def spec_keys(self, name: str, context: Iterable[str] = ()) -> list[str]:
        """The keys a spec of ``name`` may set (builder parameters minus those the caller supplies)."""
        params = inspect.signature(self.builder(name)).parameters
        return [p for p in params if p not in set(context)]

    def build(self, spec: Mapping[str, Any], **context: Any) -> Any:
        """Build from ``spec``. ``context`` offers arguments the caller owns (d_model, linear, ...);
        each builder receives those its signature names, and a spec may not set them."""
        spec = dict(spec)
        if "name" not in spec:
            raise spec_error(f"{self.axis}.name", None, self.names())
        name = spec.pop("name")
        builder = self.builder(name)
        allowed = self.spec_keys(name, context)
        for key in spec:
            if key not in allowed:
                raise spec_error(f"{self.axis}.{key}", spec[key], f"keys of {name!r}: {', '.join(allowed)}")
        params = inspect.signature(builder).parameters
        return builder(**spec, **{k: v for k, v in context.items() if k in params})
