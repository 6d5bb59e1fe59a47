"""Delta tables through Delta Lake's own Spark integration (``delta-spark``): the cluster engine.

Used when Delta's jars are on Spark's classpath (``spark-submit --packages
io.delta:delta-spark_4.2_2.13:<version>`` or jars baked into the image). Every operation is Delta's
native one, so writes and MERGEs run fully distributed. The session factory sets Delta's default
table properties so new tables have deletion vectors disabled and the delta-rs engine can read
them too.

Locally the jars come from ``make setup`` (``.jars/spark``); the storage contract's tests run on
both engines in one session. Where this engine differs: a failed write can leave uncommitted
data files in the table folder (never visible; ``vacuum`` removes them), and commits that
conflict with a concurrent one are retried as delta-rs's are.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from deltalake import DeltaTable as DeltaRsTable

from recsys_spark.errors import CommitFailedError, SchemaMismatchError, TableNotFoundError
from recsys_spark.logs import get_logger, log_event
from recsys_spark.storage.base import (
    COMMIT_ATTEMPTS,
    CommitResult,
    Idempotency,
    PartitionFilter,
    TableEngine,
    WriteMode,
    check_files_exist,
    check_layout,
    merge_predicate,
    missing_local_files,
    partition_filters_sql,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = get_logger("storage.delta_spark")

_TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"
_USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"
# Delta's optimistic-concurrency failures: nothing was committed, the operation may run again.
_CONFLICTS = ("DELTA_CONCURRENT", "ConcurrentAppendException", "ConcurrentDeleteReadException",
              "ConcurrentDeleteDeleteException", "ConcurrentTransactionException", "MetadataChangedException")


class DeltaSparkEngine(TableEngine):
    """Delta Lake's Spark API for every operation."""

    name = "delta-spark"

    def __init__(self, spark: SparkSession) -> None:
        from delta.tables import DeltaTable  # the Python half of delta-spark; needs the jars

        self.spark = spark
        self._delta_table = DeltaTable

    def exists(self, path: str) -> bool:
        return bool(self._delta_table.isDeltaTable(self.spark, path))

    def version(self, path: str) -> int:
        return int(self._table(path).history(1).select("version").first()[0])

    def transaction_version(self, path: str, app_id: str) -> int | None:
        # Delta's Python API has no accessor for SetTransaction; delta-rs reads the same log.
        if not self.exists(path):
            return None
        return DeltaRsTable(path).transaction_version(app_id)

    def history(self, path: str, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self._table(path).history(limit) if limit else self._table(path).history()
        return [row.asDict(recursive=True) for row in rows.collect()]

    def commit_metadata(self, path: str) -> dict[int, dict[str, str]]:
        rows = self._table(path).history().select("version", "userMetadata").collect()
        return {int(row["version"]): json.loads(row["userMetadata"] or "{}") for row in rows}

    def read(
        self, path: str, *, version: int | None = None, timestamp: datetime | None = None
    ) -> DataFrame:
        if not self.exists(path):
            raise TableNotFoundError(f"no Delta table at {path}")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        if timestamp is not None:
            reader = reader.option("timestampAsOf", timestamp.isoformat())
        try:
            df = reader.load(path)
        except Exception as exc:
            if "DELTA_TIMESTAMP_EARLIER_THAN_COMMIT_RETENTION" in str(exc):
                raise TableNotFoundError(f"table {path} did not exist at {timestamp}") from exc
            raise
        # the version's files, from the log: gone ones fail here, not inside a Spark job
        files = df.inputFiles()
        if missing_local_files(files):
            shown = version if version is not None else self.version(path)
            check_files_exist(path, shown, files, latest=version is None and timestamp is None)
        return df

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
    ) -> CommitResult:
        before = -1
        if self.exists(path):
            table = self._table(path)
            before = self.version(path)
            # An overwrite of selected partitions keeps the others: it must keep their schema.
            check_layout(path, table.toDF().schema, table.detail().first()["partitionColumns"], df.schema,
                         partition_by, keep_schema=mode == "append" or bool(partition_filters))
        writer = df.write.format("delta").mode(mode).partitionBy(*partition_by)
        if partition_filters:
            writer = writer.option("replaceWhere", partition_filters_sql(partition_filters))
        elif mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if idempotency is not None:
            writer = writer.option("txnAppId", idempotency.app_id)
            writer = writer.option("txnVersion", idempotency.version)
        if commit_info:
            writer = writer.option("userMetadata", json.dumps(commit_info))
        try:
            _retrying_conflicts(path, lambda: writer.save(path))
        except Exception as exc:  # Delta surfaces conflicts as Py4J/Analysis exceptions
            if "DELTA_REPLACE_WHERE_MISMATCH" in str(exc):
                raise ValueError(f"data outside the partitions being replaced ({partition_filters}) "
                                 f"in the write to {path}") from exc
            raise CommitFailedError(f"writing {path} failed, nothing was committed: {exc}") from exc
        return self._result(path, before)

    def append_arrow(
        self,
        table: pa.Table,
        path: str,
        *,
        partition_by: Sequence[str],
        idempotency: Idempotency | None,
        commit_info: dict[str, str],
    ) -> CommitResult:
        return self.write(self.spark.createDataFrame(table), path, mode="append", partition_by=partition_by,
                          partition_filters=None, idempotency=idempotency, commit_info=commit_info)

    def upsert(
        self,
        df: DataFrame | pa.Table,
        path: str,
        *,
        keys: Sequence[str],
        update_condition: str | None,
        idempotency: Idempotency | None,
        commit_info: dict[str, str],
    ) -> CommitResult:
        if isinstance(df, pa.Table):
            df = self.spark.createDataFrame(df)
        before = self.version(path)
        extra = sorted(set(df.columns) - set(self._table(path).toDF().columns))
        if extra:  # Delta's updateAll would drop them silently
            raise SchemaMismatchError(f"upsert into {path}: unexpected columns {extra}")
        merge = (
            self._table(path)
            .alias("t")
            .merge(df.alias("s"), merge_predicate(keys))
            .whenMatchedUpdateAll(condition=update_condition)
            .whenNotMatchedInsertAll()
        )
        with self._session_conf(idempotency, commit_info):
            try:
                _retrying_conflicts(path, merge.execute)
            except Exception as exc:
                raise CommitFailedError(f"upsert into {path} failed: {exc}") from exc
        return self._result(path, before, merged=True)

    def delete(self, path: str, predicate: str) -> CommitResult:
        before = self.version(path)
        self._table(path).delete(predicate)
        result = self._result(path, before)
        metrics = self.history(path, 1)[0].get("operationMetrics") or {}
        return CommitResult(version=result.version, rows_deleted=int(metrics.get("numDeletedRows", 0)))

    def optimize(self, path: str) -> dict[str, Any]:
        rows = self._table(path).optimize().executeCompaction().collect()
        return rows[0].asDict(recursive=True) if rows else {}

    def vacuum(self, path: str, retention_hours: float) -> list[str]:
        # Delta refuses retention below its safety threshold unless this check is off; the
        # retention comes from our config, which is the user's explicit decision.
        self.spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        before = _visible_files(path)
        self._table(path).vacuum(retention_hours)
        return sorted(before - _visible_files(path))  # Delta logs counts only

    def _table(self, path: str) -> Any:
        if not self.exists(path):
            raise TableNotFoundError(f"no Delta table at {path}")
        return self._delta_table.forPath(self.spark, path)

    def _result(self, path: str, before: int, *, merged: bool = False) -> CommitResult:
        after = self.version(path)
        if after == before:
            log_event(log, "delta.write.skipped", table=path)
            return CommitResult(version=after, skipped=True)
        metrics = self.history(path, 1)[0].get("operationMetrics") or {}
        if merged:  # a MERGE's output rows include the unchanged rows it copied
            rows = int(metrics.get("numTargetRowsInserted", 0)) + int(metrics.get("numTargetRowsUpdated", 0))
        else:
            rows = int(metrics.get("numOutputRows", 0))
        files = int(metrics.get("numFiles", 0) or metrics.get("numTargetFilesAdded", 0))
        log_event(log, "delta.write", table=path, version=after, rows=rows, files=files)
        return CommitResult(version=after, rows_written=rows, files_added=files)

    @contextmanager
    def _session_conf(
        self, idempotency: Idempotency | None, commit_info: dict[str, str]
    ) -> Iterator[None]:
        """DML (MERGE) takes idempotency and commit metadata from session conf, not options."""
        values: dict[str, str] = {}
        if idempotency is not None:
            values[_TXN_APP_ID] = idempotency.app_id
            values[_TXN_VERSION] = str(idempotency.version)
        if commit_info:
            values[_USER_METADATA] = json.dumps(commit_info)
        for key, value in values.items():
            self.spark.conf.set(key, value)
        try:
            yield
        finally:
            for key in values:
                self.spark.conf.unset(key)


def _retrying_conflicts(path: str, operation: Callable[[], object]) -> None:
    """Run ``operation``; again (a few times) when a concurrent commit conflicted with it."""
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            operation()
            return
        except Exception as exc:
            if attempt == COMMIT_ATTEMPTS or not any(name in str(exc) for name in _CONFLICTS):
                raise
            log_event(log, "delta.commit_conflict", table=path, attempt=attempt, error=str(exc)[:300])
            time.sleep(0.1 * attempt)


def _visible_files(path: str) -> set[str]:
    """The table folder's files outside Delta's log and hidden folders (local tables)."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        found.update(os.path.join(folder, f) for f in files if not f.startswith(("_", ".")))
    return found
