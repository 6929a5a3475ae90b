"""Bad inputs, as a new user types them: what each prints and what it leaves recorded.

    python -m bench.bad_inputs [--dir FOLDER]

In a scratch folder it trains one good tiny run, then runs each bad input below through the real
CLI (``lab train``, ``lab grid``, ``lab sweep``, ``lab compare``, ``lab status``) and prints a
markdown table: the input, the exit code, the one line printed, and what MLflow holds afterwards.
A row is marked FAIL when the input printed a traceback, printed other than one ``error:`` line,
exited 0 or 1 where a refusal (2) was due, or changed what was recorded before it (the good run's
status, metrics or checkpoints). Exits 1 when any row fails.

CPU only, a few minutes: every refusal is meant to come before training starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient

TINY = [
    "model=tiny", "precision=fp32", "data.seq_len=32", "data.batch_size=2", "data.val_tokens=256",
    "trainer.max_steps=4", "trainer.val_every=2", "trainer.log_every=1", "trainer.checkpoint_every=2",
    "trainer.progress_bar=false",
]  # fmt: skip
GOOD = "out/good"


@dataclass
class Case:
    args: list[str]  # after ``lab``
    shown: str  # how the table shows the input
    exit: int = 2  # the exit code a refusal gives; 1 is a run or study that failed and was recorded


def train(*extra: str) -> list[str]:
    return ["train", *TINY, *extra]


def cases() -> list[Case]:
    t = lambda *a, exit=2: Case(train(*a), " ".join(a), exit)  # noqa: E731
    return [
        t("attention=flash"),
        t("trainer.max_stpes=3"),
        t("+atention=mla"),
        t("attention=gqa", "model.n_kv_heads=3"),
        t("ffn=moe", "model.top_k=9"),
        t("trainer.max_steps=abc"),
        t("trainer.max_steps=0"),
        t("trainer.max_steps=-5"),
        t("trainer.checkpoint_every=0"),
        t("trainer.log_every=0"),
        t("trainer.val_every=0"),
        t("optim.lr=-1"),
        t("optim.lr=abc"),
        t("data.batch_size=0"),
        t("data.seq_len=10000000"),
        t("data.val_fraction=1.5"),
        t("precision=fp9"),
        t("speed=fastest"),
        t("cluster=nosuch"),
        t("tracking.uri=http://127.0.0.1:9"),
        t("data=text", "data.path=missing.txt"),
        t("data=text", "data.path=empty_folder"),
        t("data=text", "data.path=one_line.txt"),
        t("resume=nowhere"),
        t("resume=random.ckpt"),
        t("resume=evil.ckpt"),
        t(f"resume={GOOD}", "attention=mha"),
        t(f"resume={GOOD}", "trainer.max_steps=abc"),
        t("trainer=ddp", "trainer.devices=0"),
        t("trainer=nosuch"),
        Case(["grid", "nosuch"], "lab grid nosuch"),
        Case(["grid", "bad_second_choice", *TINY], "lab grid G (second arm attention=foo)"),
        Case(["grid", "bad_second_arm", *TINY], "lab grid G (second arm model.n_kv_heads=3)"),
        Case(["grid", "quick", "--jobs", "0", *TINY], "lab grid quick --jobs 0"),
        Case(["grid", "quick", "--gpus", "a,b", *TINY], "lab grid quick --gpus a,b"),
        Case(["grid", "quick", "--cfg", "job"], "lab grid quick --cfg job"),
        Case(["grid", "quick", "trainer.max_stpes=3"], "lab grid quick trainer.max_stpes=3"),
        Case(["compare", "nosuch"], "lab compare nosuch"),
        Case(["compare", "adhoc", "--where", "model.name"], "lab compare adhoc --where model.name"),
        Case(["compare", "adhoc", "--baseline", "attention=x"], "lab compare adhoc --baseline attention=x"),
        Case(["sweep", "nosuch"], "lab sweep nosuch"),
        Case(["sweep", "typo_key"], "lab sweep S (space key balance.gamm)"),
        Case(["sweep", "typo_key_ok", "--trials", "0"], "lab sweep S --trials 0"),
        Case(
            ["sweep", "typo_key_ok", "cluster=slurm_local", "--storage", "sqlite:///o.db"],
            "lab sweep S cluster=slurm_local --storage sqlite:///o.db",
        ),
        Case(["sweep", "typo_key_ok", "--trails", "3"], "lab sweep S --trails 3"),
        Case(["sweep", "typo_key_ok", "--storage", "mysql://x"], "lab sweep S --storage mysql://x"),
        Case(["status", "nosuch"], "lab status nosuch"),
    ]


def write_inputs(root: Path) -> None:
    """The files the bad inputs name: a corrupt checkpoint, one that would run code, grids, studies."""

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    (root / "random.ckpt").write_bytes(os.urandom(4096))
    torch.save({"state_dict": RunsCode()}, root / "evil.ckpt")  # a real checkpoint's zip layout
    (root / "empty_folder").mkdir(exist_ok=True)
    (root / "one_line.txt").write_text("a single short document\n")
    grids, sweeps = root / "ablations", root / "sweeps"
    grids.mkdir(exist_ok=True)
    sweeps.mkdir(exist_ok=True)
    grid = "# @package _global_\nablation: {name}\ngrid:\n  params:\n{params}  seeds: [0]\n"
    (grids / "bad_second_choice.yaml").write_text(
        grid.format(name="bad_second_choice", params="    attention: [mha, foo]\n")
    )
    (grids / "bad_second_arm.yaml").write_text(
        grid.format(name="bad_second_arm", params="    attention: [gqa]\n    model.n_kv_heads: [2, 3]\n")
    )
    study = (
        "objectives: [{{metric: val/bpb, direction: minimize}}]\n"
        "space:\n  {key}: {{type: float, low: 1e-4, high: 1e-2, log: true}}\n"
        "budget: {{n_trials: 2}}\noverrides: [{overrides}]\n"
    )
    overrides = ", ".join(TINY)
    (sweeps / "typo_key.yaml").write_text(study.format(key="balance.gamm", overrides=overrides))
    (sweeps / "typo_key_ok.yaml").write_text(study.format(key="optim.lr", overrides=overrides))


def lab(root: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    env.setdefault("LAB_CACHE_DIR", str(root / "cache"))
    return subprocess.run([sys.executable, "-m", "research.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def recorded(root: Path) -> dict[str, tuple]:
    """Every run in the store: run id -> (experiment, status, metrics)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    out = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            out[run.info.run_id] = (exp.name, run.info.status, dict(run.data.metrics))
    return out


def checkpoints(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (root / GOOD).glob("**/*.ckpt")}


def one_row(root: Path, n: int, case: Case) -> tuple[str, bool]:
    before, ckpts = recorded(root), checkpoints(root)
    proc = lab(root, case.args)
    after = recorded(root)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    shown = errors[0] if errors else (proc.stderr.strip().splitlines() or ["(nothing)"])[-1]
    changed = [r for r in before if after.get(r) != before[r]]
    new = [after[r][1] for r in after if r not in before]
    state = ", ".join(
        [f"{len(new)} new run(s): {'/'.join(sorted(set(new)))}" if new else "no new run"]
        + ([f"{len(changed)} earlier run(s) CHANGED"] if changed else [])
        + (["checkpoints CHANGED"] if checkpoints(root) != ckpts else [])
    )
    ok = (
        "Traceback" not in proc.stderr
        and len(errors) == 1
        and proc.returncode == case.exit
        and not changed
        and checkpoints(root) == ckpts
        and not (root / "PWNED").exists()
    )
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    row = f"| {n} | `{cell(case.shown)}` | {proc.returncode} | {cell(shown)} | {state} |"
    return row + ("" if ok else " FAIL"), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    root = (args.dir or Path(tempfile.mkdtemp(prefix="bad-inputs-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    write_inputs(root)
    good = lab(root, train(f"hydra.run.dir={GOOD}"))
    if good.returncode != 0:
        sys.exit(f"error: the good run failed:\n{good.stderr[-3000:]}")
    print(f"scratch folder: {root}\n")
    print("| # | input (`lab train` + tiny settings, unless shown) | exit | printed | recorded afterwards |")
    print("|---|---|---|---|---|")
    failures = 0
    for n, case in enumerate(cases(), 1):
        row, ok = one_row(root, n, case)
        failures += not ok
        print(row, flush=True)
    total = len(cases())
    print(f"\n{total - failures} of {total} inputs refused cleanly, nothing recorded before them lost")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
