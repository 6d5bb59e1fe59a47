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
    ]
    operations = {"read", "write", "upsert", "delete", "history", "optimize", "vacuum", "version",
                  "exists", "tables", "transaction_version", "lock", "path", "scratch"}
    assert operations <= set(dir(storage.Lakehouse))


def test_stage_entry_points() -> None:
    assert ingest.__all__ == ["IngestReport", "run_ingest"]
    assert features.__all__ == ["FeatureReport", "build_features"]
