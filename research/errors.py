"""Failures the CLI reports in one line (importable without the heavy training stack)."""


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any training starts."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run is recorded as FAILED with this message."""


class DecodeError(ValueError):
    """A request decoding cannot serve: no such run or checkpoint, a prompt past the context."""
