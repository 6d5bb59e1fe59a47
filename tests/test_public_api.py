"""The exported names of the library, so a change to the public surface is deliberate."""

from __future__ import annotations

import recsys_spark.features as features
import recsys_spark.ingest as ingest
import recsys_spark.storage as storage


def test_storage_api() -> None:
    assert sorted(storage.__all__) == [
        "CommitResult",
        "Idempotency",
        "Lakehouse",
        "PartitionFilter",
        "Scratch",
        "TableInfo",
        "check_table_name",
        "open_lakehouse",
        "read_table",
        "resolve_engine",
        "table_dataset",
        "table_files",
        "table_path",
        "table_version",
    ]
    operations = {"read", "write", "upsert", "delete", "history", "optimize", "vacuum", "version",
                  "exists", "tables", "transaction_version", "lock", "path", "scratch"}
    assert operations <= set(dir(storage.Lakehouse))


def test_stage_entry_points() -> None:
    assert ingest.__all__ == ["IngestReport", "run_ingest"]
    assert features.__all__ == ["FeatureReport", "build_features"]


def test_named_errors_live_in_one_module() -> None:
    import ast
    from pathlib import Path

    package = Path(storage.__file__).parents[1]
    elsewhere = []
    for path in package.rglob("*.py"):
        if path.name == "errors.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and not node.name.startswith("_"):
                elsewhere.append(f"{path.relative_to(package)}:{node.name}")
    assert not elsewhere, f"errors defined outside recsys_spark/errors.py: {elsewhere}"
