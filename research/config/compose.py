"""Composing a run's config: the Hydra tree in ``research/conf`` plus the grid files and cluster
profiles of the working folder and the project, and the one-line errors for a key that does not
exist (Hydra's own hint would be to add it with ``+``, where nothing reads it)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "research" / "conf"  # the config tree Hydra composes from (research.conf)


def search_roots() -> list[Path]:
    """Folders holding grid files (``ablations/``) or Slurm profiles (``cluster/``): the working
    folder's first, then the project's."""
    roots = [Path.cwd(), REPO_ROOT]
    return [r for i, r in enumerate(roots)
            if ((r / "ablations").is_dir() or (r / "cluster").is_dir()) and r not in roots[:i]]  # fmt: skip


def searchpath_override() -> str:
    return "hydra.searchpath=[" + ",".join(f"file://{r}" for r in search_roots()) + "]"


def named_files(folder: str) -> list[str]:
    """The names of the YAML files in ``folder/`` of the working folder and of the project."""
    return sorted(
        {p.stem for r in dict.fromkeys([Path.cwd(), REPO_ROOT]) for p in (r / folder).glob("*.yaml")}
    )


def compose_run(overrides: list[str]) -> DictConfig:
    """The config ``lab train OVERRIDES`` runs (grid files and ./cluster profiles found too)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("research.conf", version_base="1.3"):
        return compose("train", overrides=[searchpath_override(), *overrides])


def first_job(overrides: list[str]) -> list[str]:
    """The overrides of a multirun's first job (first value of every sweep), Hydra's own keys out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    job = []
    for o in OverridesParser.create().parse_overrides([a for a in overrides if not a.startswith("-")]):
        if o.get_key_element().startswith(("hydra.", "hydra/", "+hydra")):
            continue
        sweep = o.is_sweep_override()
        value = next(iter(o.sweep_string_iterator())) if sweep else o.get_value_element_as_str()
        job.append(f"{o.get_key_element()}={value}")
    return job


@contextmanager
def naming_unknown_keys(overrides: list[str]):
    """Hydra's hint for an unknown key is to add it with +, where nothing would read it: say
    instead that there is no such key, and which one was likely meant."""
    try:
        yield
    except Exception as e:
        unknown = re.search(r"Could not override '([^']+)'", str(e))
        override = next((o for o in overrides if unknown and o.split("=", 1)[0] == unknown[1]), None)
        if override is None:
            raise
        raise ValueError(f"{override}: no such key{_did_you_mean(overrides, override)}") from None


def _did_you_mean(overrides: list[str], override: str) -> str:
    """'; did you mean KEY=VALUE?' with the nearest existing key of ``override``'s node, or ''."""
    import difflib

    key, value = override.lstrip("+").split("=", 1)
    base = compose_run([o for o in overrides if o != override])
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent, default=None) if parent else base
    choices = [str(c) for c in node] if isinstance(node, DictConfig) else []
    if not parent:
        choices += [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    close = difflib.get_close_matches(leaf, choices, n=1)
    return f"; did you mean {parent + '.' if parent else ''}{close[0]}={value}?" if close else ""


def refuse_unread_additions(overrides: list[str]) -> None:
    """``+key=value`` adds a key; one that no config has and no group names is read by nothing, and
    a run with it would silently train without it (Hydra's own typo hint suggests the ``+``)."""

    added = [o for o in overrides if o.startswith("+") and not o.startswith("++") and "=" in o]
    if not added:
        return
    base = compose_run([o for o in overrides if o not in added])
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"ablations"}
    for o in added:
        key = o[1:].split("=", 1)[0]
        if key not in groups and OmegaConf.select(base, key, default=None) is None:
            raise ValueError(f"{o} adds a key that nothing reads{_did_you_mean(overrides, o)}")
