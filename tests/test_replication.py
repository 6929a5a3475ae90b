"""The replication page: the papers' numbers beside ours, ours computed as the comparison does."""

from scipy import stats

from bench import replication
from research import metrics as M
from research.experiments.compare import Report, RunRecord


def run(arm: str, seed: int, **metrics: float) -> RunRecord:
    return RunRecord(f"{arm}{seed}", "v3", arm, seed, "FINISHED", "", metrics)


AUX_LOSS = [4.4, 4.9, 4.1]
AUX_FREE = [0.31, 0.42, 0.27]


def test_the_page_puts_each_papers_number_beside_ours_paired_by_seed(tmp_path):
    runs = [run("moe_aux_loss", s, **{M.MAXVIO_GLOBAL: v, M.VAL_BPB: 1.55}) for s, v in enumerate(AUX_LOSS)]
    runs += [run("moe_aux_free", s, **{M.MAXVIO_GLOBAL: v, M.VAL_BPB: 1.52}) for s, v in enumerate(AUX_FREE)]
    runs += [run("all_four", s, **{M.VAL_LOSS: 1.0 + s / 100, M.MTP_ACCEPTANCE: a})
             for s, a in enumerate([0.5, 0.6, 0.7])]  # fmt: skip
    runs += [
        run("all_four_fp8", s, **{M.VAL_LOSS: (1.0 + s / 100) * f})
        for s, f in enumerate([1.002, 1.003, 1.001])
    ]
    page = replication.write_page(
        Report(tmp_path, [], runs), tmp_path, "python -m bench.replication", 420.0, "H200"
    )
    text = page.read_text()
    (maxvio,) = [
        line
        for line in text.splitlines()
        if line.startswith("| aux-loss-free bias vs auxiliary loss: MaxVio")
    ]
    p = stats.ttest_rel(AUX_FREE, AUX_LOSS).pvalue
    assert "0.72 → 0.04 (Loss-Free Balancing, 1B MoE)" in maxvio
    assert "4.4667 → 0.3333 (Δ -4.13 [" in maxvio and f"p={p:.2g}, paired t)" in maxvio
    (fp8,) = [line for line in text.splitlines() if line.startswith("| FP8 vs BF16")]
    assert "below 0.25%" in fp8 and "+0.20%" in fp8  # the mean relative error of the three seeds
    assert "| MTP (depth 1) vs none: val/bpb | 0.729 vs 0.729" in text and "| not run |" in text
    (accepted,) = [line for line in text.splitlines() if line.startswith("| ... and with all four")]
    assert "| 85-90% (DeepSeek-V3 §5.4.3) | 0.6000 ± 0.1000 (3 seeds) |" in accepted  # the arm's own number
    assert "python -m bench.replication" in text and "7.0 minutes wall" in text and "3 seeds" in text


def test_every_question_names_arms_of_the_shipped_grid():
    from research.experiments.grid import arms, compose_grid

    shipped = set(arms(compose_grid(replication.GRID, [])))
    for q in replication.QUESTIONS:
        assert {q.arm, q.baseline or q.arm} <= shipped, q.question
    assert [q.arm for q in replication.QUESTIONS if q.relative] == ["all_four_fp8"]  # as the paper states it
