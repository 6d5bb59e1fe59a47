"""The package's layers import one way: a change that adds an arrow back up, or a loop between
two stage packages, fails here rather than in a reviewer's head."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "recsys_spark"
# Bottom to top. A unit (a top-level module or subpackage of recsys_spark) may import units of
# its own layer or below; within a layer the imports must not form a loop.
LAYERS: list[set[str]] = [
    {"constants", "errors", "logs", "processes"},
    {"config", "records"},
    {"spark", "tracking", "generate", "broker"},
    {"storage"},
    {"modeling"},  # what training, evaluation and serving share
    {"ingest", "features", "evaluation", "training", "serving", "baselines"},  # stage packages
    {"demo"},
    {"cli"},
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "recsys_spark" and len(parts) > 1 else None


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def unit_imports() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> the files that import it."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in PACKAGE.rglob("*.py"):
        source = _unit("recsys_spark." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if source is None or source == "__init__":
            continue
        for module in _imported_modules(path):
            target = _unit(module)
            if target is not None and target != source:
                edges[source][target].append(str(path.relative_to(REPO)))
    return edges


def test_every_unit_has_a_layer() -> None:
    units = {_unit(f"recsys_spark.{p.stem}") for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    units |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert units - LEVEL.keys() == set(), "place new modules in LAYERS"


def test_no_import_runs_back_up() -> None:
    upward = [f"{source} -> {target} ({', '.join(sorted(set(files)))})"
              for source, targets in unit_imports().items() for target, files in targets.items()
              if LEVEL[target] > LEVEL[source]]
    assert not upward


def test_no_two_units_import_each_other() -> None:
    edges = unit_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for target in edges.get(start, {}):
            if target == goal or (target not in seen and not seen.add(target) and reaches(target, goal, seen)):
                return True
        return False

    loops = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a, set())})
    assert not loops, f"units in an import loop: {loops}"


@pytest.mark.parametrize("folder,forbidden", [
    ("models", {"pyspark", "mlflow", "recsys_spark", "pandas", "pyarrow", "deltalake"}),
])
def test_models_package_is_plain_pytorch(folder: str, forbidden: set[str]) -> None:
    for path in (REPO / folder).glob("*.py"):
        for name in _imported_modules(path):
            assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_training_ranks_import_neither_spark_nor_mlflow() -> None:
    """``train_worker`` runs in every DDP rank: importing Spark or MLflow there costs each rank
    seconds at start and ties it to the driver's environment."""
    import subprocess
    import sys

    code = ("import sys, recsys_spark.training.loop; "
            "print(sorted(m for m in ('pyspark', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
