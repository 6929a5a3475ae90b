"""``lab``: the command line.

lab train [OVERRIDES]                 train one config (Hydra: -m for a multirun, --help, --cfg job)
lab grid NAME [OVERRIDES] [--jobs N] [--gpus 0,1,..] [--wait]
                                      run the grid ablations/NAME.yaml, then compare its arms;
                                      cluster=PROFILE sends it to Slurm as a job array
lab compare NAME [NAME..] [--where KEY=VALUE] [--baseline ARM] [--summary METRIC=HOW] [--out DIR]
                                      table, plots and report of grids already run
lab sweep NAME [OVERRIDES] [--workers N] [--trials N] [--storage URL] [--wait]
                                      run (or resume) the Optuna study sweeps/NAME.yaml;
                                      cluster=PROFILE sends the workers to Slurm
lab generate RUN "PROMPT" [--max-new N] [--temperature T] [--top-p P] [--speculative]
                                      text from a trained run (its folder, checkpoint or MLflow run id)
lab decode-bench RUN [--batches 1,8] [--contexts 1024,8192] [--log]
                                      decode tokens/s, cache GiB, largest batch, MTP acceptance
lab status NAME [--uri URI]           Slurm state, MLflow run and logs of each job of a grid or sweep
lab server [tracking.server.KEY=V]    an MLflow tracking server (PostgreSQL) for a cluster's jobs
lab grid --list | lab sweep --list    what there is
"""

# The commands import what they run when they run it: listing grids or printing help stays free of
# torch, Lightning and MLflow.

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from research.config.compose import (
    CONF_DIR,
    compose_run,
    first_job,
    named_files,
    naming_unknown_keys,
    searchpath_override,
)
from research.errors import TrainingDiverged
from research.launch import launcher_name
from research.runtime import USER_ERRORS, one_line, quiet

USAGE = __doc__.split("\n", 2)[2]


def print_train_help(overrides: list[str]) -> None:
    """``lab train --help``: the choices of each config group, the Slurm profiles and grid files
    found in the working folder and the project, and the config these overrides compose. Written
    here, not left to Hydra: its help also lists each of its own groups, deep-copying the config
    repository once per group, which makes help slower than one composition."""
    with naming_unknown_keys(overrides):  # first: a bad override prints no half help
        config = OmegaConf.to_yaml(compose_run(overrides))
    groups = sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and not d.name.startswith("_"))
    choices = (f"{g.name}: {', '.join(sorted(f.stem for f in g.glob('*.yaml')))}" for g in groups)
    print("lab train: one training run. Pick a choice of any group (group=choice), set any key (key=value).",
          "\n== Configuration groups ==", *choices,
          "\n== Found in this folder and the project ==",
          f"cluster (a Slurm profile, ./cluster/NAME.yaml): {', '.join(['local', *named_files('cluster')])}",
          f"ablations (a grid, run by lab grid NAME): {', '.join(named_files('ablations'))}",
          "\n== Config ==\nOverride anything in the config (foo.bar=value)\n", config,
          sep="\n", end="")  # fmt: skip


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from research.training.run import print_summary, run_dir_of_hydra_job, train

    run_dir, overrides = run_dir_of_hydra_job()
    try:
        result = train(cfg, run_dir, overrides)
    except (*USER_ERRORS, TrainingDiverged) as e:
        prefix = "run failed" if isinstance(e, TrainingDiverged) else "error"
        print(f"{prefix}: {one_line(e)}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # one bad arm does not stop the grid
        sys.exit(1 if isinstance(e, TrainingDiverged) else 2)
    print_summary(cfg, run_dir, result)
    return result.metrics.get("val/bpb")


# Hydra's flags that take a value as the next word.
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun")  # fmt: skip
INFO_TOPICS = (
    "all",
    "config",
    "defaults",
    "defaults-tree",
    "plugins",
    "searchpath",
)  # --info's optional value
INSPECT_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--version")


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags and the overrides apart: argparse wants all overrides in one run of words."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        takes_value = word in VALUE_FLAGS or (
            word in ("--info", "-i") and args[i + 1 : i + 2] in [[t] for t in INFO_TOPICS]
        )
        (flags if word.startswith("-") else overrides).append(word)
        if takes_value and i + 1 < len(args):
            flags.append(args[i + 1])
            i += 1
        i += 1
    return flags, overrides


def _train(rest: list[str]) -> None:
    from research.training.preflight import checked_config

    flags, overrides = split_flags(rest)
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    inspecting = any(f.split("=")[0] in INSPECT_FLAGS for f in flags)
    if any(f in ("--help", "-h") for f in flags):
        try:
            return print_train_help(overrides)
        except Exception as e:
            fail_if(one_line(e))
    if resume and not inspecting and not any(f in ("-m", "--multirun") for f in flags):
        return _resume(resume, overrides)
    if not inspecting:
        try:
            cfg = checked_config(overrides)
        except Exception as e:
            fail_if(one_line(e))
        if launcher_name(cfg) != "local":  # one run with a cluster profile becomes a job there
            several = any(f in ("-m", "--multirun") for f in flags)
            fail_if("several runs on Slurm go in a grid: lab grid NAME cluster=PROFILE" if several else None)
            from research.experiments.grid import submit_run

            try:
                return submit_run(cfg, first_job(overrides))
            except USER_ERRORS as e:
                fail_if(one_line(e))
    # argv[0] stays the real program: Lightning's DDP launcher re-runs it for the other ranks.
    sys.argv = [sys.argv[0], *flags, *overrides, searchpath_override()]
    train_app()


def _resume(resume: str, overrides: list[str]) -> None:
    """``lab train resume=RUN``: the run's own config continues in its own folder (no Hydra job:
    composing the defaults would train another model into the run)."""
    from research.training.checkpoints import resumed_config, run_folder_of
    from research.training.preflight import check
    from research.training.run import train

    try:
        cfg = resumed_config(resume, overrides)
        check(cfg)
    except Exception as e:
        fail_if(one_line(e))
    try:
        train(cfg, run_folder_of(resume), overrides)
    except USER_ERRORS as e:
        fail_if(one_line(e))
    except TrainingDiverged as e:
        print(f"run failed: {one_line(e)}", file=sys.stderr)
        sys.exit(1)


def _grid(rest: list[str]) -> None:
    import argparse

    from research.experiments import grid  # with torch: only once a grid is asked for
    from research.training.preflight import precheck

    parser = argparse.ArgumentParser(
        prog="lab grid", description="Run a grid from ablations/, then compare it."
    )
    parser.add_argument("name", nargs="?", help="the grid: ablations/NAME.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (CPU); default 1")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids: one run per GPU, pinned")
    parser.add_argument("--wait", action="store_true",
                        help="on Slurm (cluster=PROFILE): wait for the job array, then compare")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the grids and exit")
    args, overrides = parser.parse_known_args(rest)
    _refuse_unknown_options(parser, overrides)
    if args.list or not args.name:
        print("grids: " + ", ".join(named_files("ablations")))
        return
    fail_if(None if args.jobs >= 1 else f"--jobs={args.jobs} is not allowed; allowed: 1 or more")
    gpus = args.gpus.split(",") if args.gpus else None
    bad_gpu = next((g for g in gpus or [] if not re.fullmatch(r"\d+|(GPU|MIG)-[\w-]+", g.strip())), None)
    if bad_gpu is not None:
        fail_if(f"--gpus={args.gpus}: {bad_gpu!r} is not a GPU; allowed: indices or UUIDs, comma-separated")
    try:
        with naming_unknown_keys(overrides):
            cfg = grid.compose_grid(args.name, overrides)
        jobs = grid.expand(args.name, cfg, overrides)
    except Exception as e:
        fail_if(one_line(e))
    for job in {job.arm: job for job in reversed(jobs)}.values():  # every arm, before any starts
        problem = precheck(job.overrides)
        fail_if(f"arm '{job.arm}': {problem}" if problem else None)
    try:
        local = launcher_name(cfg) == "local"
        failed = grid.run_grid(args.name, overrides, jobs=args.jobs, gpus=gpus, wait=args.wait)
        if local or args.wait:
            from research.experiments.compare import compare

            compare([cfg.ablation], uri=cfg.tracking.uri)
    except USER_ERRORS as e:
        fail_if(one_line(e))
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _compare(rest: list[str]) -> None:
    import argparse

    from research.experiments.compare import compare

    parser = argparse.ArgumentParser(prog="lab compare", description="Compare the arms of one or more grids.")
    parser.add_argument("names", nargs="+", help="grid (MLflow experiment) names")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose param KEY equals VALUE, e.g. model.name=small")  # fmt: skip
    parser.add_argument("--baseline", help="the arm deltas are measured against (default: the grid's)")
    parser.add_argument("--uri", default="sqlite:///mlruns.db", help="MLflow tracking URI")
    parser.add_argument("--out", type=Path, help="report folder (default: reports/NAME/TIMESTAMP)")
    parser.add_argument("--all-configs", action="store_true",
                        help="also runs of other configs than the newest, as arms of their own")  # fmt: skip
    parser.add_argument("--summary", action="append", default=[], metavar="METRIC=HOW",
                        help="one run's number from its history: last (default), min, max or mean_last_K, "
                             "e.g. val/bpb=mean_last_3")  # fmt: skip
    args = parser.parse_args(rest)
    for option, given in (("--where", args.where), ("--summary", args.summary)):
        bad = [w for w in given if "=" not in w]
        fail_if(f"{option} {bad[0]!r} is not KEY=VALUE" if bad else None)
    where = dict(w.split("=", 1) for w in args.where)
    summaries = dict(w.split("=", 1) for w in args.summary)
    try:
        compare(
            args.names,
            uri=args.uri,
            where=where,
            baseline=args.baseline,
            out=args.out,
            all_configs=args.all_configs,
            summaries=summaries,
        )
    except USER_ERRORS as e:
        fail_if(one_line(e))


def _sweep(rest: list[str]) -> None:
    import argparse

    from research.training.preflight import precheck

    parser = argparse.ArgumentParser(
        prog="lab sweep", description="Run or resume an Optuna study from sweeps/."
    )
    parser.add_argument("name", nargs="?", help="the study: sweeps/NAME.yaml")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the study's storage")
    parser.add_argument("--trials", type=int, help="the budget (default: the file's budget.n_trials)")
    parser.add_argument("--storage", help="sqlite:///F.db, postgresql://..., or journal:PATH")
    parser.add_argument("--wait", action="store_true",
                        help="on Slurm: wait for the workers, report here (else a job does)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    args, overrides = parser.parse_known_args(rest)
    _refuse_unknown_options(parser, overrides)
    if args.list or not args.name:
        print("studies: " + ", ".join(named_files("sweeps")))
        return
    from research.experiments import sweep, sweep_spec

    try:
        spec = sweep_spec.load_spec(args.name, overrides, args.trials, args.storage)
    except Exception as e:
        fail_if(one_line(e))
    for corner in sweep_spec.corner_overrides(spec.space):  # every space key, before the study exists
        problem = precheck([*spec.overrides, *corner])
        fail_if(f"sweep '{args.name}' space: {problem}" if problem else None)
    fail_if(None if args.workers >= 1 else f"--workers={args.workers} is not allowed; allowed: 1 or more")
    try:
        study = sweep.run_sweep(spec, workers=args.workers, wait=args.wait)
        waited = args.wait or launcher_name(compose_run(spec.overrides)) == "local"
    except USER_ERRORS as e:
        fail_if(one_line(e))
    states = [t.state.name for t in study.trials]
    done = states.count("COMPLETE") + states.count("PRUNED")
    if waited and "COMPLETE" not in states:
        print(f"error: no trial of study '{spec.name}' completed ({states.count('FAIL')} failed); "
              f"see the report's failures", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    if waited and done < spec.n_trials:  # failed trials count towards a worker's quota, not the budget
        print(f"error: study '{spec.name}' has {done} of {spec.n_trials} trials done "
              f"({states.count('FAIL')} failed, see the report's failures); the same command runs "
              f"the rest", file=sys.stderr)  # fmt: skip
        sys.exit(1)


def _status(rest: list[str]) -> None:
    import argparse

    from research.experiments.status import print_status

    parser = argparse.ArgumentParser(prog="lab status", description="Slurm jobs of a grid or sweep.")
    parser.add_argument("name", help="the grid's ablation name or the sweep's study name")
    parser.add_argument("--uri", default="sqlite:///mlruns.db", help="MLflow tracking URI")
    args = parser.parse_args(rest)
    try:
        print_status(args.name, args.uri)
    except USER_ERRORS as e:
        fail_if(one_line(e))


def _server(rest: list[str]) -> None:
    from research.tracking.server import serve

    if rest[:1] in (["-h"], ["--help"]):
        print("lab server [tracking.server.KEY=VALUE ...]: run the MLflow tracking server of conf/tracking")
        return
    try:
        serve(compose_run(rest).tracking.server)
    except Exception as e:
        fail_if(one_line(e))


def _generate(rest: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="lab generate", description="Text from a trained run.")
    parser.add_argument("run", help="a run folder, a checkpoint file, or an MLflow run id")
    parser.add_argument("prompt", nargs="+", help="one or more prompts, decoded as one batch")
    parser.add_argument("--max-new", type=int, default=200, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=None, help="0: greedy (default 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speculative", action="store_true",
                        help="greedy, drafted by the MTP modules (same text, fewer passes)")  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true", help="replay one compiled step as a CUDA graph (GPU)"
    )
    parser.add_argument("--uri", default="sqlite:///mlruns.db", help="MLflow tracking URI, for a run id")
    args = parser.parse_args(rest)
    fail_if(f"--max-new {args.max_new}: expected a positive number of tokens" if args.max_new < 1 else None)
    fail_if("--speculative decodes greedily: drop --temperature or give 0"
            if args.speculative and args.temperature not in (None, 0) else None)  # fmt: skip
    from research.inference.engine import Sampling
    from research.training.trained import complete, load_trained

    try:
        temperature = 0.0 if args.speculative else 0.8 if args.temperature is None else args.temperature
        sampling = Sampling(temperature, args.top_p, args.seed)
        trained = load_trained(args.run, args.uri, device=None)
        texts, note = complete(trained, args.prompt, args.max_new, sampling, args.speculative, args.compile)
    except USER_ERRORS as e:
        fail_if(one_line(e))
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(prompt + text, end="\n\n")
    if note:
        print(note, file=sys.stderr)


def _decode_bench(rest: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="lab decode-bench", description="What decoding a trained run costs."
    )
    parser.add_argument("run", help="a run folder, a checkpoint file, or an MLflow run id")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument(
        "--contexts", default=None, help="comma-separated cached positions (default: data.seq_len)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="the largest batch's budget (default: the GPU's free memory)")  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true", help="replay one compiled step as a CUDA graph (GPU)"
    )
    parser.add_argument("--log", action="store_true", help="also log the metrics to the run's MLflow run")
    parser.add_argument("--uri", default="sqlite:///mlruns.db", help="MLflow tracking URI")
    args = parser.parse_args(rest)
    batches = _positive_ints("--batches", args.batches)
    contexts = _positive_ints("--contexts", args.contexts) if args.contexts else None
    from research.inference.measure import DecodeSettings, free_memory_gib
    from research.training.trained import load_trained, log_to_run, measure_decoding

    try:
        trained = load_trained(args.run, args.uri, device=None)
        budget = args.memory_gib or free_memory_gib(trained.model.embed.weight.device)
        settings = DecodeSettings(
            batches, contexts or (trained.context,), args.new_tokens, budget, args.compile
        )
        values = measure_decoding(trained, settings)
        width = max(map(len, values))
        print(*(f"{name:<{width}}  {value:,.4g}" for name, value in values.items()), sep="\n")
        if args.log:
            print(f"logged to MLflow run {log_to_run(trained, values, args.uri)}")
    except USER_ERRORS as e:
        fail_if(one_line(e))


def _positive_ints(option: str, text: str) -> tuple[int, ...]:
    words = text.split(",")
    ok = all(w.strip().isdigit() and int(w) > 0 for w in words)
    fail_if(None if ok else f"{option} {text!r}: expected positive integers separated by commas, e.g. 1,8")
    return tuple(int(w) for w in words)


def _refuse_unknown_options(parser: Any, overrides: list[str]) -> None:
    """What argparse does not know passes on as overrides; a ``--flag`` there is a typo or another
    command's option (``--cfg`` is ``lab train``'s), and Hydra's parse error would not say so."""
    flag = next((o for o in overrides if o.startswith("-")), None)
    if flag is not None:
        known = sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})
        fail_if(f"{flag}: not an option of {parser.prog}; its options: {', '.join(known)} "
                f"(settings go as KEY=VALUE)")  # fmt: skip


def fail_if(problem: str | None) -> None:
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


COMMANDS = {"train": _train, "grid": _grid, "compare": _compare, "sweep": _sweep, "status": _status,
            "server": _server, "generate": _generate, "decode-bench": _decode_bench}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS and "LOCAL_RANK" in os.environ:
        command, rest = "train", argv  # a rank started by Lightning's DDP launcher: `lab train` minus "train"
    if command not in COMMANDS:
        fail_if(f"unknown command '{command}'; commands: {', '.join(COMMANDS)}")
    quiet()
    COMMANDS[command](rest)


if __name__ == "__main__":
    main()
