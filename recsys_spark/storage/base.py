"""What every storage engine offers: the Delta operations the stages need, on table paths.

Two implementations sit beside this file: ``delta_spark.py`` (Delta's own Spark integration, for
clusters with Delta's jars) and ``delta_rs.py`` (Spark writes Parquet, the ``deltalake`` package
commits; the embedded default). Both produce genuine Delta tables that either can read.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from recsys_spark.constants import LAYERS
from recsys_spark.errors import SchemaMismatchError, TableNameError, TableNotFoundError, TableUnreadableError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

WriteMode = Literal["append", "overwrite"]
# One conjunct of a partition selection: (column, "=" | "in", value or values).
PartitionFilter = tuple[str, Literal["=", "in"], Any]

# Delta features whose data cannot be read by listing a version's Parquet files alone.
FILE_LEVEL_UNSAFE_FEATURES = ("deletionVectors", "columnMapping")

_SQL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Commits that conflict with a concurrent one are tried this often in all, on either engine.
COMMIT_ATTEMPTS = 5
TABLE_NAME = re.compile(r"^(?P<layer>[a-z]+)/(?P<table>[a-z][a-z0-9_]*)$")


def check_table_name(table: str) -> str:
    """``table`` if it is ``<layer>/<name>`` with a known layer, else ``TableNameError``."""
    match = TABLE_NAME.match(table)
    if match is None or match["layer"] not in LAYERS:
        raise TableNameError(
            f"table name {table!r} must be '<layer>/<name>' with layer in {', '.join(LAYERS)}"
        )
    return table


@dataclass(frozen=True)
class Idempotency:
    """Delta's application transaction: a write tagged (app_id, version) is applied at most once.

    Engines record the pair in the same commit as the data and skip the write when the table has
    already committed ``version`` (or a later one) for ``app_id``.
    """

    app_id: str
    version: int


@dataclass(frozen=True)
class CommitResult:
    """What a write did: the table version it produced (or found, when skipped)."""

    version: int
    rows_written: int | None = None
    rows_deleted: int = 0
    files_added: int = 0
    skipped: bool = False


class TableEngine(ABC):
    """Delta operations on one table path. ``Lakehouse`` maps table names to paths."""

    name: str
    spark: SparkSession

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def version(self, path: str) -> int: ...

    @abstractmethod
    def read(
        self, path: str, *, version: int | None = None, timestamp: datetime | None = None
    ) -> DataFrame: ...

    @abstractmethod
    def write(
        self,
        df: DataFrame,
        path: str,
        *,
        mode: WriteMode,
        partition_by: Sequence[str],
        partition_filters: Sequence[PartitionFilter] | None,
        idempotency: Idempotency | None,
        commit_info: dict[str, str],
    ) -> CommitResult: ...

    @abstractmethod
    def upsert(
        self,
        df: DataFrame | pa.Table,
        path: str,
        *,
        keys: Sequence[str],
        update_condition: str | None,
        idempotency: Idempotency | None,
        commit_info: dict[str, str],
    ) -> CommitResult: ...

    @abstractmethod
    def append_arrow(
        self,
        table: pa.Table,
        path: str,
        *,
        partition_by: Sequence[str],
        idempotency: Idempotency | None,
        commit_info: dict[str, str],
    ) -> CommitResult:
        """Append a small driver-side Arrow table to an existing table (no Spark job)."""

    @abstractmethod
    def delete(self, path: str, predicate: str) -> CommitResult: ...

    @abstractmethod
    def history(self, path: str, limit: int | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def commit_metadata(self, path: str) -> dict[int, dict[str, str]]:
        """Version -> the key/values its commit recorded with ``commit_info``."""

    @abstractmethod
    def optimize(self, path: str) -> dict[str, Any]: ...

    @abstractmethod
    def vacuum(self, path: str, retention_hours: float) -> list[str]: ...

    @abstractmethod
    def transaction_version(self, path: str, app_id: str) -> int | None: ...


def merge_predicate(keys: Sequence[str]) -> str:
    """``t.k1 = s.k1 AND ...``: the MERGE join condition, with the source aliased ``s``."""
    for key in keys:
        if not _SQL_IDENTIFIER.match(key):
            raise ValueError(f"merge key {key!r} is not a plain column name")
    if not keys:
        raise ValueError("upsert needs at least one key column")
    return " AND ".join(f"t.{k} = s.{k}" for k in keys)


def partition_filters_sql(filters: Sequence[PartitionFilter]) -> str:
    """Render partition filters as a Spark SQL predicate (delta-spark's ``replaceWhere``)."""
    clauses = []
    for column, op, value in filters:
        if not _SQL_IDENTIFIER.match(column):
            raise ValueError(f"partition column {column!r} is not a plain column name")
        if op == "=":
            clauses.append(f"{column} = {_sql_literal(value)}")
        elif op == "in":
            values = list(value)
            if not values:
                raise ValueError(f"partition filter on {column!r} lists no values")
            clauses.append(f"{column} IN ({', '.join(_sql_literal(v) for v in values)})")
        else:
            raise ValueError(f"unsupported partition filter operator {op!r}")
    return " AND ".join(clauses)


def _sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("'", "''")
    return f"'{text}'"


def check_layout(
    location: str,
    current: StructType,
    current_partitions: Sequence[str],
    schema: StructType,
    partition_by: Sequence[str],
    *,
    keep_schema: bool,
) -> None:
    """Refuse a write whose partitioning, or (``keep_schema``) columns and types, differ from
    the table's (``current``), before anything is written."""
    if list(partition_by) != list(current_partitions):
        raise SchemaMismatchError(
            f"table {location} is partitioned by {list(current_partitions)}, the write asked for "
            f"{list(partition_by)}"
        )
    if not keep_schema:
        return
    expected = {f.name: f.dataType for f in current.fields}
    given = {f.name: f.dataType for f in schema.fields}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    wrong = sorted(n for n in set(expected) & set(given)
                   if _strip_nullability(expected[n]) != _strip_nullability(given[n]))
    if missing or extra or wrong:
        raise SchemaMismatchError(
            f"write to {location}: missing columns {missing}, unexpected columns {extra}, "
            f"different types {wrong}"
        )


def _strip_nullability(data_type: Any) -> str:
    """A type's identity without nullability flags, which Spark and Delta track differently."""
    text = data_type.json()
    for flag in ('"containsNull":false', '"valueContainsNull":false', '"nullable":false'):
        text = text.replace(flag, flag.replace("false", "true"))
    return text


def check_files_exist(path: str, version: int, files: Sequence[str], *, latest: bool) -> None:
    """Data files the version needs that are gone: say so, rather than fail later inside a
    Spark job. Local files only (a stat each); remote stores are left to the reader. Of the
    newest version vacuum never removes a file: there they were deleted outside Delta."""
    missing = missing_local_files(files)
    if not missing:
        return
    gone = f"{missing} of its {len(files)} data files are gone"
    if latest:
        raise TableUnreadableError(
            f"table {path} v{version} cannot be read: {gone}, deleted outside Delta (vacuum keeps "
            "every file of the newest version); restore them from a backup, or overwrite the table"
        )
    raise TableNotFoundError(
        f"table {path} v{version} can no longer be read: {gone} (removed by a vacuum, which keeps "
        "only storage.vacuum_retention_hours of history, or deleted outside Delta)"
    )


def missing_local_files(files: Sequence[str]) -> int:
    """How many of ``files`` (paths or ``file:`` URIs; remote ones are not checked) are gone."""
    # Spark's input files are Hadoop paths as text ("file:/x", decoded), delta-rs's plain paths
    local = [(f.removeprefix("file://") if f.startswith("file:///") else f.removeprefix("file:"))
             for f in files if "://" not in f or f.startswith("file:")]
    return sum(not os.path.exists(f) for f in local)
