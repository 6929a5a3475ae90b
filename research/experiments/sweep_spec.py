"""A sweep file (``sweeps/NAME.yaml``) read and checked: objectives, search space, sampler, pruner,
budget; every problem is one line naming the key, before any study exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from components.registry import require, spec_error
from research import metrics as M
from research.config.compose import CONF_DIR, REPO_ROOT, named_files
from research.runtime import redact

DIRECTIONS = ("minimize", "maximize")


SAMPLERS = ("tpe", "random", "grid", "nsga2", "nsga3", "gp")


PRUNERS = ("none", "median", "successive_halving", "hyperband")


SPACE_TYPES = ("float", "int", "categorical")


def sweep_dirs() -> list[Path]:
    return [d for d in (Path.cwd() / "sweeps", REPO_ROOT / "sweeps") if d.is_dir()]


def available() -> list[str]:
    return named_files("sweeps")


@dataclass
class SweepSpec:
    name: str
    objectives: list[tuple[str, str]]  # (metric, direction)
    space: dict[str, dict[str, Any]]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    timeout: float | None
    overrides: list[str]  # fixed for every trial
    storage: str
    experiment: str
    enqueue: list[dict[str, Any]] = field(default_factory=list)

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.objectives]


def load_spec(
    name: str, overrides: list[str] = (), n_trials: int | None = None, storage: str | None = None
) -> SweepSpec:
    """Read and check ``sweeps/NAME.yaml``; every problem is a one-line ValueError naming the key."""
    path = next((d / f"{name}.yaml" for d in sweep_dirs() if (d / f"{name}.yaml").exists()), None)
    if path is None:
        raise spec_error("sweep", name, available())
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    known = {"study", "objectives", "space", "sampler", "pruner", "budget", "overrides", "storage", "enqueue"}
    for key in raw:
        require(key in known, f"sweep.{key}", raw[key], ", ".join(sorted(known)))
    objectives = []
    for i, o in enumerate(raw.get("objectives") or []):
        require(o.get("metric") in M.ALL, f"objectives[{i}].metric", o.get("metric"), ", ".join(M.ALL))
        require(
            o.get("direction") in DIRECTIONS,
            f"objectives[{i}].direction",
            o.get("direction"),
            "minimize, maximize",
        )
        objectives.append((o["metric"], o["direction"]))
    require(bool(objectives), "objectives", None, "a list of {metric, direction}")
    space = raw.get("space") or {}
    require(bool(space), "space", space, "a mapping of config keys to {type, ...}")
    for key, s in space.items():
        _check_dimension(key, s)
    sampler = raw.get("sampler") or {"name": "tpe"}
    pruner = raw.get("pruner") or {"name": "none"}
    require(sampler.get("name") in SAMPLERS, "sampler.name", sampler.get("name"), ", ".join(SAMPLERS))
    require(pruner.get("name") in PRUNERS, "pruner.name", pruner.get("name"), ", ".join(PRUNERS))
    if len(objectives) > 1:
        require(
            pruner["name"] == "none",
            "pruner.name",
            pruner["name"],
            "none (Optuna prunes single-objective studies only)",
        )
    if sampler["name"] == "grid":
        require(all(s["type"] == "categorical" for s in space.values()), "sampler.name", "grid",
                "a space of categoricals only")  # fmt: skip
    budget = raw.get("budget") or {}
    trials = budget.get("n_trials") if n_trials is None else n_trials
    key = "budget.n_trials" if n_trials is None else "--trials"
    require(isinstance(trials, int) and trials >= 1, key, trials, "a positive integer")
    storage = storage or raw.get("storage") or "sqlite:///optuna.db"
    _check_storage(storage)
    study = raw.get("study") or name
    return SweepSpec(
        name=study,
        objectives=objectives,
        space=space,
        sampler=sampler,
        pruner=pruner,
        n_trials=trials,
        timeout=budget.get("timeout"),
        overrides=[*(raw.get("overrides") or []), *overrides],
        storage=storage,
        experiment=f"sweep_{study}",
        enqueue=raw.get("enqueue") or [],
    )


def _check_storage(url: str) -> None:
    """A URL Optuna cannot open fails here in one line, not as an ImportError from its RDB layer."""
    allowed = (
        "sqlite:///FILE.db, postgresql://USER@HOST/DB, journal:PATH, or an RDB URL whose driver is installed"
    )
    if url.startswith("journal:"):
        require(url != "journal:", "storage", url, allowed)
        return
    from sqlalchemy.engine import make_url

    try:
        make_url(url).get_dialect().import_dbapi()
    except Exception as e:
        raise spec_error("storage", redact(url), redact(f"{allowed} ({type(e).__name__}: {e})")) from None


def _check_dimension(key: str, s: dict[str, Any]) -> None:
    where = f"space.{key}"
    require(
        isinstance(s, dict) and s.get("type") in SPACE_TYPES,
        f"{where}.type",
        (s or {}).get("type"),
        ", ".join(SPACE_TYPES),
    )
    if s["type"] == "categorical":
        choices = s.get("choices") or []
        require(len(choices) >= 1, f"{where}.choices", choices, "a non-empty list")
        group = CONF_DIR / key
        if "." not in key and group.is_dir():  # a component axis: each choice must be a config file
            allowed = sorted(p.stem for p in group.glob("*.yaml"))
            for c in choices:
                require(str(c) in allowed, f"{where}.choices", c, ", ".join(allowed))
        return
    low, high = s.get("low"), s.get("high")
    require(
        isinstance(low, int | float) and isinstance(high, int | float),
        f"{where}.low",
        low,
        "numbers low and high",
    )
    require(low < high, f"{where}.low", low, f"less than high={high}")
    if s.get("log"):
        require(low > 0, f"{where}.low", low, "> 0 with log: true")
    if s["type"] == "int":
        require(int(s.get("step", 1)) >= 1, f"{where}.step", s.get("step"), "a positive integer")


def corner_overrides(space: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Overrides that set every key of the space at once, at each end of its range (each choice of
    a categorical in turn): composing them before the study exists catches a key no config has
    (``balance.gamm``), where every trial would otherwise fail."""
    ends = {
        k: s["choices"] if s["type"] == "categorical" else [s["low"], s["high"]] for k, s in space.items()
    }
    widest = max(len(v) for v in ends.values())
    return [[f"{k}={v[min(i, len(v) - 1)]}" for k, v in ends.items()] for i in range(widest)]
