"""``lab``: the command line.

lab train [OVERRIDES]      train one config (or a grid with -m / an experiment in multirun mode)
lab train --help           Hydra's help: the config groups and their choices
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from research.errors import TrackingError, TrainingDiverged

CONF_DIR = Path(__file__).resolve().parent / "conf"
USAGE = __doc__.split("\n", 2)[2]
USER_ERRORS = (ValueError, TrackingError, FileNotFoundError)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from research.train import run_dir_of_hydra_job, train

    run_dir, overrides = run_dir_of_hydra_job()
    try:
        metrics = train(cfg, run_dir, overrides)
    except (*USER_ERRORS, TrainingDiverged) as e:
        prefix = "run failed" if isinstance(e, TrainingDiverged) else "error"
        print(f"{prefix}: {one_line(e)}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # one bad arm does not stop the grid
        sys.exit(1 if isinstance(e, TrainingDiverged) else 2)
    return metrics.get("val/bpb")


def precheck(overrides: list[str]) -> str | None:
    """Compose the config (first value of any sweep) and build the model on the meta device, so a
    typo or an impossible spec fails in one line before Hydra starts any job."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from research.config import model_config, precision_of
    from research.model import Transformer

    job_overrides = []
    try:
        for o in OverridesParser.create().parse_overrides([a for a in overrides if not a.startswith("-")]):
            if o.get_key_element().startswith(("hydra.", "hydra/", "+hydra")):
                continue
            value = (
                next(iter(o.sweep_string_iterator()))
                if o.is_sweep_override()
                else o.get_value_element_as_str()
            )
            job_overrides.append(f"{o.get_key_element()}={value}")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=job_overrides)
        precision_of(cfg)
        with torch.device("meta"):
            Transformer(model_config(cfg, vocab_size=256))
    except Exception as e:  # Hydra's errors span lines; the user gets the gist in one
        return one_line(e).split(" Config search path")[0]
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command != "train":
        print(f"error: unknown command '{command}'; commands: train", file=sys.stderr)
        sys.exit(2)
    hydra_flags = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--resolve", "--package", "-p")
    if not any(a.split("=")[0] in hydra_flags for a in rest):
        problem = precheck(rest)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=".*isinstance\\(treespec, LeafSpec\\)"
    )  # Lightning vs new torch
    sys.argv = [f"{Path(sys.argv[0]).name} train", *rest]
    train_app()


if __name__ == "__main__":
    main()
