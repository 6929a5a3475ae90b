"""The one check of a config before anything runs or is recorded: ``lab train``, each grid arm,
each sweep corner and ``train()`` itself go through it. A bad key is one line naming it
(``trainer.max_steps=abc``, ``optim.lr=-1``, an impossible attention spec), not a traceback from
inside the trainer; the model is built on the meta device, so this needs no data and no GPU."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from components.registry import require, spec_error
from research.config.build import model_config, precision_of
from research.config.compose import compose_run, first_job, naming_unknown_keys, refuse_unread_additions
from research.launch import launcher_name
from research.model.transformer import Transformer
from research.runtime import one_line
from research.training.strategies import make_strategy

# key -> (type, low, high, whether low itself is allowed; high always is). ``int`` keys take no fractions.
RANGES: dict[str, tuple[type, float, float, bool]] = {
    "seed": (int, 0, 2**32 - 1, True),
    "trainer.max_steps": (int, 1, math.inf, True),
    "trainer.val_every": (int, 1, math.inf, True),
    "trainer.log_every": (int, 1, math.inf, True),
    "trainer.checkpoint_every": (int, 1, math.inf, True),
    "trainer.perf_warmup_steps": (int, 0, math.inf, True),
    "trainer.accumulate": (int, 1, math.inf, True),
    "trainer.num_nodes": (int, 1, math.inf, True),
    "trainer.grad_clip": (float, 0, math.inf, True),
    "optim.lr": (float, 0, math.inf, False),
    "optim.eps": (float, 0, math.inf, False),
    "optim.weight_decay": (float, 0, math.inf, True),
    "optim.warmup_steps": (int, 0, math.inf, True),
    "optim.total_steps": (int, 1, math.inf, True),
    "optim.min_lr_ratio": (float, 0, 1, True),
    "data.seq_len": (int, 2, math.inf, True),
    "data.batch_size": (int, 1, math.inf, True),
    "data.val_tokens": (int, 1, math.inf, True),
    "data.val_fraction": (float, 0, 1, False),
    "data.test_fraction": (float, 0, 1, True),
    "data.bpe_vocab_size": (int, 257, math.inf, True),
    "eval.decode_new_tokens": (int, 1, math.inf, True),
    "eval.decode_memory_gib": (float, 0, math.inf, False),
}
# Lists of positive integers: key -> what the list is.
POSITIVE_LISTS = {"eval.decode_batches": "batch sizes", "eval.decode_contexts": "cached positions"}


def _allowed(kind: type, low: float, high: float, inclusive: bool) -> str:
    what = "an integer" if kind is int else "a number"
    if high == math.inf:
        return f"{what} {'>=' if inclusive else '>'} {low:g}"
    shown = str(int(high)) if kind is int else f"{high:g}"
    return f"{what} in {'[' if inclusive else '('}{low:g}, {shown}]"


def check_ranges(cfg: DictConfig) -> None:
    """Raise a one-line ValueError for the first numeric key out of its type or range."""
    for key, (kind, low, high, inclusive) in RANGES.items():
        value: Any = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue  # not set by this config (e.g. a data source without a tokenizer size)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = number and (kind is float or float(value).is_integer()) and math.isfinite(value)
        ok = ok and (value >= low if inclusive else value > low) and value <= high
        if not ok:
            raise spec_error(key, value, _allowed(kind, low, high, inclusive))
    devices = OmegaConf.select(cfg, "trainer.devices", default="auto")
    as_list = OmegaConf.to_object(devices) if OmegaConf.is_list(devices) else None
    countable = isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1
    listed = as_list is not None and len(as_list) > 0 and all(isinstance(d, int) and d >= 0 for d in as_list)
    if not (devices == "auto" or countable or listed):
        raise spec_error("trainer.devices", devices, "auto, an integer >= 1, or a list of device indices")
    for key, what in POSITIVE_LISTS.items():
        given = OmegaConf.select(cfg, key, default=None)
        if given is None and key == "eval.decode_contexts":
            continue  # data.seq_len
        values = OmegaConf.to_object(given) if OmegaConf.is_list(given) else None
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise spec_error(key, given, f"a non-empty list of positive integers ({what}), e.g. [1, 8]")
    for betas in [OmegaConf.select(cfg, "optim.betas", default=None)]:
        if betas is not None and not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise spec_error("optim.betas", list(betas), "two numbers in [0, 1)")


def precheck(overrides: list[str]) -> str | None:
    """``checked_config`` as a one-line problem, or None."""
    try:
        checked_config(overrides)
    except Exception as e:  # Hydra's errors span lines; the user gets the gist in one
        return one_line(e)
    return None


def checked_config(overrides: list[str]) -> DictConfig:
    """Compose the config (first value of any sweep) and ``check`` it, so a typo or an impossible
    spec fails before Hydra starts any job."""
    job = first_job(overrides)
    refuse_unread_additions(job)
    with naming_unknown_keys(job):
        cfg = compose_run(job)
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """What can fail about a composed config, checked without data or a device."""
    check_ranges(cfg)
    precision_of(cfg)
    make_strategy(cfg.trainer)
    deterministic(cfg.trainer)
    launcher_name(cfg)
    with torch.device("meta"):
        Transformer(model_config(cfg, vocab_size=256))


DETERMINISTIC = (False, True, "warn")


def deterministic(t: DictConfig) -> bool | str:
    """``trainer.deterministic``: atomics-based kernels (the embedding's gradient, flash
    attention's backward) make two runs of one config differ by more than a precision change does;
    ``true`` makes them repeat. ``warn`` only warns about such kernels, which it leaves on."""
    value = t.get("deterministic", False)
    require(value in DETERMINISTIC, "trainer.deterministic", value, "false, true, warn")
    return value
