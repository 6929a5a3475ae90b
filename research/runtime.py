"""What every command shares, kept light (no torch): errors as one line, quiet logs, passwords kept
out of what is recorded and printed, and time-stamped output folders."""

from __future__ import annotations

import logging
import re
import warnings
from datetime import datetime
from pathlib import Path

from research.errors import TrackingError

_URL_PASSWORD = re.compile(r"(://[^/@:\s]+):[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it masked: what
    the platform records (params, tags, ``config.yaml``) or prints is readable by everyone who
    can read the store."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


USER_ERRORS = (ValueError, TrackingError, FileNotFoundError)


def one_line(e: BaseException) -> str:
    """An error as one line; Hydra's composition errors lose their search-path listing."""
    return " ".join(str(e).split()).split(" Config search path")[0]


def quiet() -> None:
    """Lightning's banners (GPU available, tips), MLflow's schema set-up and one upstream
    deprecation add nothing here."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for schema_setup in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # a new store's tables
        logging.getLogger(schema_setup).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)"
    )  # Lightning vs torch 2.13
    # Validation sums are all-reduced before they are logged (LitLM, MoEMonitor): no sync_dist needed.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting")
    # The batches are sliced from a memory-mapped array in the main process: workers would only copy.
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck")
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)  # LOCAL_RANK: 0 - ...
    # Slurm's client tools being installed does not mean this run is meant to be a Slurm job.
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system")


def stamped(root: Path) -> Path:
    """``root/YYYY-MM-DD_HH-MM-SS``: one launch's or report's folder (not created)."""
    return Path(root) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
