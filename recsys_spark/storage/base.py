"""What every storage engine offers: the Delta operations the stages need, on table paths.

Two implementations sit beside this file: ``delta_spark.py`` (Delta's own Spark integration, for
clusters with Delta's jars) and ``delta_rs.py`` (Spark writes Parquet, the ``deltalake`` package
commits; the embedded default). Both produce genuine Delta tables that either can read.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from recsys_spark.constants import LAYERS
from recsys_spark.errors import TableNameError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

WriteMode = Literal["append", "overwrite"]
# One conjunct of a partition selection: (column, "=" | "in", value or values).
PartitionFilter = tuple[str, Literal["=", "in"], Any]

# Delta features whose data cannot be read by listing a version's Parquet files alone.
FILE_LEVEL_UNSAFE_FEATURES = ("deletionVectors", "columnMapping")

_SQL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
