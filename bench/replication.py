"""DeepSeek-V3's choices at small scale, with the papers' numbers beside ours.

    python -m bench.replication [--jobs 15] [--out docs/results/v3_replication] [OVERRIDES ...]

Runs ``ablations/v3_replication.yaml`` through the user path (``lab grid``: what finished before is
skipped), compares it (``lab compare``'s report goes to ``OUT/report/``), and writes
``OUT/README.md``: each question the papers answer, their number, ours with its 95% interval and
paired p, then the command, the machine and the wall time that reproduce it.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from research import metrics as M
from research.experiments.compare import Report, RunRecord, compare
from research.experiments.significance import Delta, compare_by_seed

GRID = "v3_replication"
OUT = Path("docs/results") / GRID


@dataclass(frozen=True)
class Question:
    question: str
    arm: str
    baseline: str  # "": the arm's own number, no comparison
    metric: str
    paper: str  # their number, and where it is from
    relative: bool = False  # ours as the arm's relative difference, in %


QUESTIONS = (
    Question("aux-loss-free bias vs auxiliary loss: MaxVio (global)", "moe_aux_free", "moe_aux_loss",
             M.MAXVIO_GLOBAL, "0.72 → 0.04 (Loss-Free Balancing, 1B MoE)"),
    Question("aux-loss-free bias vs auxiliary loss: val/bpb", "moe_aux_free", "moe_aux_loss", M.VAL_BPB,
             "0.727 → 0.724 Pile BPB (DeepSeek-V3 Table 5, small MoE)"),
    Question("V3's balancing (bias + sequence-wise loss) vs auxiliary loss: val/bpb", "moe_v3_balance",
             "moe_aux_loss", M.VAL_BPB, "0.727 → 0.724 Pile BPB (DeepSeek-V3 Table 5)"),
    Question("sequence-wise vs batch-wise auxiliary loss: val/loss", "moe_seq_aux", "moe_aux_loss",
             M.VAL_LOSS, "2.258 vs 2.253 (DeepSeek-V3 §4.5.3, 1B MoE; batch-wise matches aux-free)"),
    Question("MTP (depth 1) vs none: val/bpb", "mtp", "baseline", M.VAL_BPB,
             "0.729 vs 0.729 Pile BPB (V3 Table 4); hurts below ~1B (Gloeckle et al. 2024)"),
    Question("MLA vs MHA: val/bpb", "mla", "baseline", M.VAL_BPB,
             "MLA 3.1559 vs GQA 3.1492 loss at d1024 (Marin, lr-swept): parity or slightly behind"),
    Question("MLA vs MHA: KV-cache bytes per token", "mla", "baseline", M.KV_CACHE_BYTES_PER_TOKEN,
             "MLA caches 512 + 64 values per layer against MHA's 2 x heads x head_dim"),
    Question("DeepSeekMoE (aux loss) vs dense: val/bpb", "moe_aux_loss", "baseline", M.VAL_BPB, "-"),
    Question("all four vs baseline: val/bpb", "all_four", "baseline", M.VAL_BPB, "-"),
    Question("FP8 vs BF16 (all four): relative val/loss error", "all_four_fp8", "all_four", M.VAL_LOSS,
             "below 0.25% (DeepSeek-V3, 16B and 230B)", relative=True),
    Question("MTP as speculative decoding: depth 1's drafts kept (greedy)", "mtp", "", M.MTP_ACCEPTANCE,
             "85-90% of second tokens, 1.8x tokens/s (DeepSeek-V3 §5.4.3)"),
    Question("... depth 2: its first draft kept", "mtp_d2", "", M.MTP_ACCEPTANCE, "-"),
    Question("... depth 2: its second draft kept, given the first", "mtp_d2", "", f"{M.MTP_ACCEPTANCE}/d2",
             "-"),
    Question("... and with all four", "all_four", "", M.MTP_ACCEPTANCE, "85-90% (DeepSeek-V3 §5.4.3)"),
    Question("MTP speculative decoding: tokens/s over plain greedy (the GPU shared by the grid)", "mtp", "",
             M.SPECULATIVE_SPEEDUP, "1.8x (DeepSeek-V3 §5.4.3)"),
)  # fmt: skip


def _by_seed(runs: list[RunRecord], arm: str, metric: str) -> dict[int, float]:
    return {r.seed: r.metrics[metric] for r in runs
            if r.arm == arm and r.status == "FINISHED" and metric in r.metrics}  # fmt: skip


def ours(runs: list[RunRecord], q: Question) -> str:
    """The arm's number beside its baseline's, and the difference with its interval and p."""
    arm, base = _by_seed(runs, q.arm, q.metric), _by_seed(runs, q.baseline, q.metric)
    fmt = M.spec_of(q.metric).format
    if arm and not q.baseline:  # a number of the arm alone
        values = list(arm.values())
        spread = f" ± {fmt(float(np.std(values, ddof=1)))}" if len(values) > 1 else ""
        return f"{fmt(float(np.mean(values)))}{spread} ({len(values)} seeds)"
    if not arm or not base:
        return "not run"
    a, b = float(np.mean(list(arm.values()))), float(np.mean(list(base.values())))
    d: Delta = compare_by_seed(arm, base)
    if q.relative:
        rel = lambda x: f"{100 * x / b:+.2f}%"  # noqa: E731
        interval = "" if np.isnan(d.ci_low) else f" [{rel(d.ci_low)}, {rel(d.ci_high)}]"
        return f"{rel(d.delta)}{interval}" + ("" if np.isnan(d.p_value) else f", p={d.p_value:.2g}")
    if np.isnan(d.ci_low) or d.ci_low == d.ci_high:
        return f"{fmt(b)} → {fmt(a)}"
    interval = f"[{d.ci_low:+.3g}, {d.ci_high:+.3g}]"
    return f"{fmt(b)} → {fmt(a)} (Δ {d.delta:+.3g} {interval}, p={d.p_value:.2g}, {d.test})"


def write_page(report: Report, out: Path, command: str, wall_s: float, machine: str) -> Path:
    """``out/README.md``: the papers' numbers beside ours, and what reproduces them."""
    seeds = sorted({r.seed for r in report.runs})
    rows = ["| question | paper | ours (baseline → arm) |", "|---|---|---|"]
    rows += [f"| {q.question} | {q.paper} | {ours(report.runs, q)} |" for q in QUESTIONS]
    failed = [f"{r.arm} seed {r.seed}: {r.reason or r.status}" for r in report.runs if r.status != "FINISHED"]
    collapsed = [f"{r.arm} seed {r.seed}" for r in report.runs if r.collapsed]
    page = [
        "# DeepSeek-V3's choices at small scale",
        "",
        f"Each of DeepSeek-V3's choices alone against a plain baseline (MHA, dense SwiGLU, no MTP), and all "
        f"four together, on `small` (`ablations/{GRID}.yaml`), {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}); "
        "differences are paired by seed, with 95% intervals. The papers' models are 10-1000x larger and "
        "trained on 10^4-10^6x more tokens: where ours and theirs disagree, scale is the first suspect.",
        "",
        *rows,
        "",
        *([f"Failed runs: {'; '.join(failed)}.", ""] if failed else []),
        *([f"Routing collapsed in: {'; '.join(collapsed)}.", ""] if collapsed else []),
        "The whole comparison (every arm and metric, the views, curves, Pareto, expert load): "
        "[report/summary.md](report/summary.md).",
        "",
        *[f"![{name}](report/{name}.png)" for name in ("val_curves", "pareto", "expert_load")
          if (out / "report" / f"{name}.png").exists()],
        "",
        "Reproduce:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Measured on {machine}: {wall_s / 60:.1f} minutes wall for the grid and its comparison.",
    ]  # fmt: skip
    (out / "README.md").write_text("\n".join(page) + "\n")
    return out / "README.md"


def main() -> None:
    from research.experiments.grid import run_grid

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=15, help="runs at once on the GPU")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--uri", default="sqlite:///mlruns.db")
    args, overrides = parser.parse_known_args()
    start = time.perf_counter()
    failed = run_grid(GRID, [*overrides, f"tracking.uri={args.uri}"], jobs=args.jobs)
    if args.out.exists():
        shutil.rmtree(args.out / "report", ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = compare([GRID], uri=args.uri, out=args.out / "report", log_to_mlflow=False)
    wall = time.perf_counter() - start
    try:
        import torch

        machine = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    except ImportError:
        machine = "CPU"
    command = f"python -m bench.replication --jobs {args.jobs}" + "".join(f" {o}" for o in overrides)
    page = write_page(report, args.out, command, wall, machine)
    print(page.read_text())
    print(f"page: {page}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
