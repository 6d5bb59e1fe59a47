"""The one storage module: every stage reads and writes tables by name through ``Lakehouse``.

Tables live at ``<root>/<layer>/<table>`` (layers: bronze, silver, gold, quarantine, serving,
ops) and are genuine Delta tables whichever engine wrote them::

    lake = open_lakehouse(spark, settings)
    lake.write(df, "silver/events", mode="append", partition_by=["event_date"])
    lake.read("silver/events", version=3)
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from recsys_spark.config import Settings
from recsys_spark.constants import LAYERS
from recsys_spark.errors import (
    EngineUnavailableError,
    TableNotFoundError,
    TableUnreadableError,
)
from recsys_spark.logs import get_logger, log_event
from recsys_spark.spark import delta_spark_loaded, hadoop_conf, jvm, literal_path
from recsys_spark.storage.arrow_reads import read_table, table_dataset, table_files, table_path, table_version
from recsys_spark.storage.base import (
    TABLE_NAME,
    CommitResult,
    Idempotency,
    PartitionFilter,
    TableEngine,
    WriteMode,
    check_table_name,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
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

log = get_logger("storage")

# Writes hold it shared, vacuum exclusively (see ``Lakehouse.vacuum``).
_WRITES_LOCK = "writes"


@dataclass(frozen=True)
class TableInfo:
    """A table of the lakehouse; ``error`` (and no version) when it cannot be read."""

    name: str
    path: str
    version: int | None
    error: str | None = None


class Lakehouse:
    """Named Delta tables under one root, through one engine."""

    def __init__(self, root: str, engine: TableEngine) -> None:
        self.root = root
        self.engine = engine

    def path(self, table: str) -> str:
        """``<root>/<layer>/<table>`` for a name like ``"silver/events"``."""
        return table_path(self.root, table)

    def exists(self, table: str) -> bool:
        return self.engine.exists(self.path(table))

    def version(self, table: str) -> int:
        path = self.path(table)
        if not self.engine.exists(path):
            raise TableNotFoundError(f"table {table} does not exist under {self.root}")
        return self.engine.version(path)

    def read(
        self, table: str, *, version: int | None = None, timestamp: datetime | None = None
    ) -> DataFrame:
        """The table as of its latest version, or as of ``version`` / ``timestamp``."""
        if version is not None and timestamp is not None:
            raise ValueError("read as of a version or a timestamp, not both")
        path = self.path(table)
        if not self.engine.exists(path):
            raise TableNotFoundError(f"table {table} does not exist under {self.root}")
        if version is not None:
            latest = self.engine.version(path)
            if not 0 <= version <= latest:
                raise TableNotFoundError(f"table {table} has no version {version} (latest {latest})")
        return self.engine.read(path, version=version, timestamp=timestamp)

    def write(
        self,
        df: DataFrame | pa.Table,
        table: str,
        *,
        mode: WriteMode = "append",
        partition_by: Sequence[str] = (),
        partition_filters: Sequence[PartitionFilter] | None = None,
        idempotency: Idempotency | None = None,
        commit_info: dict[str, str] | None = None,
    ) -> CommitResult:
        """Append, overwrite, or overwrite only ``partition_filters``' partitions, atomically.

        Args:
            df: rows to write; columns and types must match the table's when appending. An Arrow
                table (a small driver-side batch, e.g. a micro-batch) is appended to an existing
                table without a Spark job.
            table: ``"<layer>/<name>"``.
            mode: ``"append"`` or ``"overwrite"``.
            partition_by: partition columns (must match the table's once it exists).
            partition_filters: with ``mode="overwrite"``, replace only these partitions, e.g.
                ``[("event_date", "in", ["2024-01-01"])]``.
            idempotency: apply this write at most once (Delta application transaction).
            commit_info: key/values recorded in the commit (e.g. source table versions).
        """
        if partition_filters and mode != "overwrite":
            raise ValueError("partition_filters select partitions to overwrite; use mode='overwrite'")
        for column, op, value in partition_filters or ():
            # Anything else ("!=", ">") cannot be checked against the rows written.
            if op not in ("=", "in") or value is None:
                raise ValueError(
                    f"partition filter on {column!r}: use '=' or 'in' with non-null values, "
                    f"got {op!r} {value!r}"
                )
        path = self.path(table)
        with self._writing():
            if isinstance(df, pa.Table):
                if mode == "append" and self.engine.exists(path):
                    return self.engine.append_arrow(df, path, partition_by=partition_by,
                                                    idempotency=idempotency, commit_info=commit_info or {})
                df = self.engine.spark.createDataFrame(df)
            return self.engine.write(
                df,
                path,
                mode=mode,
                partition_by=partition_by,
                partition_filters=partition_filters,
                idempotency=idempotency,
                commit_info=commit_info or {},
            )

    def upsert(
        self,
        df: DataFrame | pa.Table,
        table: str,
        *,
        keys: Sequence[str],
        partition_by: Sequence[str] = (),
        update_condition: str | None = None,
        idempotency: Idempotency | None = None,
        commit_info: dict[str, str] | None = None,
    ) -> CommitResult:
        """MERGE on ``keys``: matched rows are replaced (when ``update_condition`` holds, written
        over aliases ``t`` for the table and ``s`` for ``df``), the rest inserted. Creates the
        table, partitioned by ``partition_by``, on first use. ``df`` may be an Arrow table (small
        driver-side batches such as a micro-batch's users): delta-rs then merges it without a
        round trip through Spark.
        """
        path = self.path(table)
        with self._writing():
            if not self.engine.exists(path):
                if isinstance(df, pa.Table):
                    df = self.engine.spark.createDataFrame(df)
                return self.engine.write(
                    df,
                    path,
                    mode="append",
                    partition_by=partition_by,
                    partition_filters=None,
                    idempotency=idempotency,
                    commit_info=commit_info or {},
                )
            return self.engine.upsert(
                df,
                path,
                keys=keys,
                update_condition=update_condition,
                idempotency=idempotency,
                commit_info=commit_info or {},
            )

    def delete(self, table: str, predicate: str) -> CommitResult:
        """Delete the rows matching a SQL ``predicate`` (one commit)."""
        with self._writing():
            return self.engine.delete(self._existing(table), predicate)

    def history(self, table: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Commits, newest first."""
        return self.engine.history(self._existing(table), limit)

    def commit_metadata(self, table: str, version: int) -> dict[str, str]:
        """Key/values recorded with ``commit_info`` in that version's commit."""
        every = self.commit_metadata_by_version(table)
        if version not in every:
            raise TableNotFoundError(f"table {table} has no version {version}")
        return every[version]

    def commit_metadata_by_version(self, table: str) -> dict[int, dict[str, str]]:
        """Version -> ``commit_metadata`` of every commit still in the table's log."""
        return self.engine.commit_metadata(self._existing(table))

    def optimize(self, table: str) -> dict[str, Any]:
        """Compact small files into larger ones (a data-preserving commit)."""
        with self._writing():
            metrics = self.engine.optimize(self._existing(table))
        log_event(log, "table.optimized", table=table)
        return metrics

    def vacuum(self, table: str, retention_hours: float) -> list[str]:
        """Delete files unreferenced for ``retention_hours``, including crashed writes' orphans.

        Waits until no write on this root is in progress, and holds new ones back meanwhile: a
        write's files sit in the table folder (delta-spark) or its staging folder (delta-rs)
        before its commit references them, and a short retention would delete them.
        """
        with self.lock(_WRITES_LOCK):
            removed = self.engine.vacuum(self._existing(table), retention_hours)
        log_event(log, "table.vacuumed", table=table, files_removed=len(removed))
        return removed

    def transaction_version(self, table: str, app_id: str) -> int | None:
        """The last version committed by ``app_id`` (see ``Idempotency``), if any."""
        return self.engine.transaction_version(self.path(table), app_id)

    def tables(self) -> list[TableInfo]:
        """Every table under the root (local roots only), sorted by name."""
        found = []
        for layer in LAYERS:
            layer_dir = os.path.join(self.root, layer)
            if not os.path.isdir(layer_dir):
                continue
            for name in sorted(os.listdir(layer_dir)):
                table = f"{layer}/{name}"
                if TABLE_NAME.match(table) and self.engine.exists(self.path(table)):
                    try:
                        found.append(TableInfo(table, self.path(table), self.version(table)))
                    except TableUnreadableError as exc:  # the others are still listed
                        found.append(TableInfo(table, self.path(table), None, str(exc)))
        return found

    @contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        """Hold the lakehouse-wide lock ``name`` (e.g. ``"ingest"``), waiting for it if needed;
        ``shared``: beside other shared holders, excluding only an exclusive one.

        Stages that hand out ids (ingest's dictionaries) must not run twice at once on one
        root. Local roots use a file lock; on remote roots the orchestrator serialises them
        (the Airflow DAGs run with ``max_active_runs=1``).
        """
        if "://" in self.root:
            yield
            return
        lock_dir = Path(self.root) / "_work" / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        with (lock_dir / f"{name}.lock").open("a") as handle:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                log_event(log, "lock.wait", lock=name, root=self.root, shared=shared)
                fcntl.flock(handle, mode)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _writing(self) -> AbstractContextManager[None]:
        """Held (shared) by every write while its files are not yet committed; see ``vacuum``."""
        return self.lock(_WRITES_LOCK, shared=True)

    @contextmanager
    def scratch(self, name: str) -> Iterator[Scratch]:
        """Scratch space ``<root>/_work/<name>`` for intermediate results, removed afterwards
        (also on failure). Not a table: nothing in it is ever visible to readers."""
        scratch = Scratch(self.engine.spark, f"{self.root}/_work/{name}")
        _delete_tree(scratch.spark, scratch.path)  # a crashed attempt may have left it behind
        try:
            yield scratch
        finally:
            _delete_tree(scratch.spark, scratch.path)

    def _existing(self, table: str) -> str:
        path = self.path(table)
        if not self.engine.exists(path):
            raise TableNotFoundError(f"table {table} does not exist under {self.root}")
        return path


@dataclass(frozen=True)
class Scratch:
    """Intermediate Parquet, written once and read back by several later passes: cheaper than
    recomputing them, and cheaper than Spark's in-memory cache, whose columnar build costs
    more than a plain write."""

    spark: SparkSession
    path: str

    def put(self, df: DataFrame, name: str) -> DataFrame:
        """Materialise ``df`` as ``<path>/<name>`` and return it read back."""
        target = f"{self.path}/{name}"
        # Optimised for write speed: read back a few times, then deleted.
        (
            df.write.mode("overwrite")
            .option("compression", "none")
            .option("parquet.enable.dictionary", "false")
            .parquet(target)
        )
        return self.spark.read.parquet(literal_path(target))


def _delete_tree(spark: SparkSession, path: str) -> None:
    if "://" not in path:
        shutil.rmtree(path, ignore_errors=True)
        return
    hadoop_path = jvm(spark).org.apache.hadoop.fs.Path(path)
    hadoop_path.getFileSystem(hadoop_conf(spark)).delete(hadoop_path, True)


def resolve_engine(spark: SparkSession, requested: str) -> TableEngine:
    """The engine for ``storage.engine``: ``auto`` picks delta-spark when its jars are loaded."""
    from recsys_spark.storage.delta_rs import DeltaRsEngine

    if requested == "delta-rs":
        return DeltaRsEngine(spark)
    loaded = delta_spark_loaded(spark)
    if requested == "delta-spark" and not loaded:
        raise EngineUnavailableError(
            "storage.engine is delta-spark but Delta's jars are not on Spark's classpath; add "
            "them (make setup fetches them into spark.jars_dir, which applies when recsys starts "
            "Spark; under spark-submit: --jars with the jars of .jars/spark, or --packages "
            "io.delta:delta-spark_4.2_2.13:4.4.0) or use storage.engine=delta-rs"
        )
    if loaded:
        from recsys_spark.storage.delta_spark import DeltaSparkEngine

        return DeltaSparkEngine(spark)
    return DeltaRsEngine(spark)


def open_lakehouse(spark: SparkSession, settings: Settings) -> Lakehouse:
    """The lakehouse at ``settings.root`` with the configured (or detected) engine."""
    engine = resolve_engine(spark, settings.storage.engine)
    if engine.name == "delta-rs" and "://" in settings.root:
        raise EngineUnavailableError(
            f"the delta-rs engine commits files through the local filesystem; root "
            f"{settings.root} needs storage.engine=delta-spark"
        )
    log_event(log, "lakehouse.open", root=settings.root, engine=engine.name)
    return Lakehouse(settings.root, engine)
