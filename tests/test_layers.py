"""The layers of the code, kept by reading its imports: each layer imports only those below it.

    cli -> experiments -> training -> {config, launch, tracking, inference} -> model -> components

with the leaves (metrics, errors, runtime, signals) importable from any layer of research/, and
components/ importing nothing of research/ and no framework (it is plain torch modules).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {
    "components": 0,
    "research.metrics": 1, "research.errors": 1, "research.runtime": 1, "research.signals": 1,
    "research.model": 2,
    "research.config": 3, "research.launch": 3, "research.tracking": 3, "research.inference": 3,
    "research.training": 4,
    "research.experiments": 5,
    "research.cli": 6,
}  # fmt: skip
LEAVES = {layer for layer, rank in RANK.items() if rank == 1}
FRAMEWORKS = ("lightning", "hydra", "omegaconf", "mlflow", "optuna", "submitit", "research")


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to: its longest prefix in RANK."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return None


def imported(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ``path``, function-level ones too; ``from research
    import metrics`` counts as ``research.metrics``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            pkg = root / node.module.replace(".", "/")
            subs = [a.name for a in node.names if (pkg / f"{a.name}.py").exists() or (pkg / a.name).is_dir()]
            found += [(node.lineno, f"{node.module}.{s}") for s in subs] or [(node.lineno, node.module)]
    return found


def violations(root: Path) -> list[str]:
    problems = []
    for path in sorted([*(root / "research").rglob("*.py"), *(root / "components").rglob("*.py")]):
        rel = path.relative_to(root)
        here = layer_of(".".join(rel.with_suffix("").parts))
        if here is None:
            continue  # research/conf: the config tree's package marker
        for line, module in imported(path, root):
            there = layer_of(module)
            edge = f"{rel}:{line}: {here} -> {module}"
            if here == "components":
                if module.split(".")[0] in FRAMEWORKS:
                    problems.append(f"{edge} (components/ imports no framework and nothing of research/)")
            elif there is None or there == here or (here in LEAVES and there in LEAVES):
                continue
            elif RANK[there] >= RANK[here]:
                direction = "sideways" if RANK[there] == RANK[here] else "upward"
                problems.append(f"{edge} ({direction}: {there} is not below {here})")
    return problems


def test_imports_only_run_down_the_layers():
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("where", "line", "named"),
    [
        ("research/model/oops.py", "from research.training.run import train",
         "research/model/oops.py:1: research.model -> research.training.run (upward"),
        ("research/launch/oops.py", "from research.experiments import grid",
         "research/launch/oops.py:1: research.launch -> research.experiments.grid (upward"),
        ("research/tracking/oops.py", "from research.config.compose import compose_run",
         "research/tracking/oops.py:1: research.tracking -> research.config.compose (sideways"),
        ("components/oops.py", "import lightning", "components/oops.py:1: components -> lightning"),
    ],
)  # fmt: skip
def test_an_import_against_the_layers_fails_naming_the_edge(tmp_path, where, line, named):
    for package in ("research/model", "research/training", "research/launch", "research/experiments",
                    "research/tracking", "research/config", "components"):  # fmt: skip
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    (tmp_path / "research/training/run.py").write_text("")
    (tmp_path / "research/experiments/grid.py").write_text("")
    (tmp_path / "research/config/compose.py").write_text("")
    (tmp_path / where).write_text(line + "\n")
    problems = violations(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(named), problems
