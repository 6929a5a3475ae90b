"""Checkpoints: reading one without running code, finding the newest of a config in a run folder,
and ``resume=``: loading a run's own config and refusing a change to what it computes."""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from research.config.compose import compose_run
from research.runtime import redact
from research.tracking import store as tracking


class CheckpointError(ValueError):
    """``resume`` names nothing loadable."""


@dataclass
class Resume:
    path: Path  # the checkpoint file
    run_id: str | None  # the MLflow run it belongs to
    config_hash: str | None = None  # of the config that wrote it


def find_checkpoint(resume: str) -> Resume:
    """``resume`` is a checkpoint (a file, or a DeepSpeed checkpoint folder) or a run folder (then
    its ``checkpoints/last.ckpt``)."""
    path = Path(resume).expanduser()
    if path.is_dir() and not (path / DEEPSPEED_STATES).exists():
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise CheckpointError(f"resume='{resume}': no checkpoint at {path}")
    try:
        ckpt = read_checkpoint(path)
    except Exception as e:  # read_checkpoint's own are one line; anything else is cut to its first
        reason = str(e) if isinstance(e, ValueError) else " ".join(str(e).split()).split(". ")[0]
        raise CheckpointError(f"resume='{resume}' is not a readable checkpoint: {reason}") from e
    return Resume(path, ckpt.get("mlflow_run_id"), ckpt.get("config_hash"))


# Keys a resume may change: they extend a run, not what its steps compute.
EXTENDS_A_RUN = ("trainer.max_steps",)


def run_folder_of(resume: str) -> Path:
    """The run folder ``resume`` names: itself, or the one holding ``checkpoints/FILE``."""
    path = Path(resume).expanduser()
    is_checkpoint = path.is_file() or (path / DEEPSPEED_STATES).exists()
    return path.parent.parent if is_checkpoint else path


def resumed_config(resume: str, overrides: list[str]) -> DictConfig:
    """``lab train resume=RUN [KEY=VALUE ...]``: the run's own config (``config.yaml`` in its
    folder), the overrides on top. An override that would change what the run computes (its
    config hash) is refused, except those that only extend it (``EXTENDS_A_RUN``); so is a
    checkpoint written by another config than the folder's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ckpt = find_checkpoint(resume)
    folder = run_folder_of(resume)
    config_file = folder / "config.yaml"
    if not config_file.exists():
        raise CheckpointError(f"resume='{resume}': no config.yaml in {folder} (a run folder holds one)")
    cfg = OmegaConf.load(config_file)
    before = tracking.hashed_items(cfg)
    if ckpt.config_hash is not None and ckpt.config_hash != tracking.config_hash(cfg):
        raise CheckpointError(f"resume='{resume}': {ckpt.path.name} was written by another config than "
                              f"{config_file} (config_hash {ckpt.config_hash})")  # fmt: skip
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element().lstrip("+")
        if key.startswith("hydra") or key == "resume":
            continue
        node = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig) and node.get("name") == o.value():
            continue  # a config group named as it already is (attention=mla on an MLA run)
        OmegaConf.update(cfg, key, o.value(), force_add=True)
    cfg.resume = str(ckpt.path)
    after = tracking.hashed_items(cfg)
    changed = sorted(
        k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and k not in EXTENDS_A_RUN
    )
    if changed:
        key = changed[0]
        new = after.get(key, "(removed)")
        had = before.get(key, before.get(f"{key}.name"))  # a config group: the name it had
        raise CheckpointError(f"resume='{resume}': {key}={new!r} would change what the run computes "
                              f"(it has {had!r}); a resume may change only "
                              f"{', '.join(EXTENDS_A_RUN)}")  # fmt: skip
    _unmask_tracking(cfg, overrides, resume, config_file)
    return cfg


def _unmask_tracking(cfg: DictConfig, overrides: list[str], resume: str, config_file: Path) -> None:
    """``config.yaml`` holds URLs with their passwords masked: take each from the config as
    composed now (the defaults and the command line's tracking keys) where it is the same URL."""

    recorded = tracking.flatten(OmegaConf.to_container(cfg.tracking))
    masked = [k for k, v in recorded.items() if ":***@" in str(v)]
    if not masked:
        return
    given = [o for o in overrides if o.lstrip("+").startswith("tracking.")]
    now = tracking.flatten(OmegaConf.to_container(compose_run(given).tracking, resolve=True))
    for key in masked:
        if redact(str(now.get(key))) != recorded[key]:
            raise CheckpointError(f"resume='{resume}': tracking.{key} has its password masked in "
                                  f"{config_file}; give it again: tracking.{key}=URL")  # fmt: skip
        OmegaConf.update(cfg, f"tracking.{key}", now[key])


class RecordRunId(L.Callback):
    """Puts the MLflow run id into every checkpoint, so a resume continues the same run, and the
    config hash, so an automatic resume only ever picks up a checkpoint of the same config."""

    def __init__(self, run_id: str, config_hash: str):
        self.run_id, self.config_hash = run_id, config_hash

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["mlflow_run_id"] = self.run_id
        checkpoint["config_hash"] = self.config_hash


DEEPSPEED_STATES = Path("checkpoint") / "mp_rank_00_model_states.pt"  # where DeepSpeed keeps the rest


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents without its tensors' data (memory-mapped): a Lightning file, or a
    DeepSpeed checkpoint folder (its model-states file carries Lightning's other keys).

    ``weights_only``: tensors and plain containers only, never code. Unpickling anything else
    can run what the file says (a planted checkpoint, or one a tag points at); ours hold no
    objects, and ``train()`` has Lightning load them the same way."""
    path = Path(path)
    target = path / DEEPSPEED_STATES if path.is_dir() else path
    if not zipfile.is_zipfile(target):  # torch.save's format; torch's own error names mmap options
        raise ValueError("not a checkpoint (corrupt or truncated)")
    try:
        ckpt = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's wording for the callable it refused
        what = f" ({refused[1]})" if refused else ""
        raise ValueError(f"it holds objects that could run code{what}: refused, not run") from None
    except RuntimeError as e:  # torch's reader: the cause is its first sentence
        raise ValueError(f"not a checkpoint (corrupt or truncated): {str(e).split('. ')[0]}") from None
    if not isinstance(ckpt, dict) or not ({"state_dict", "global_step"} & set(ckpt)):
        raise ValueError("not a Lightning checkpoint (no state_dict or global_step)")
    return ckpt


def find_latest(run_dir: Path, config_hash: str) -> Path | None:
    """The newest checkpoint in ``run_dir/checkpoints`` written by a run of this very config."""
    found = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        try:
            if read_checkpoint(path).get("config_hash") == config_hash:
                return path
        except Exception:
            continue  # a file cut short by the kill: try the one before
    return None
