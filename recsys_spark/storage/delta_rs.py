"""Delta tables through the ``deltalake`` (delta-rs) package: the embedded default engine.

Writes stay parallel and bounded: Spark writes the Parquet files (from every executor) into a
per-write staging folder inside the table folder; the driver moves them into the table's
partition folders under unique names, reads only their footers, and commits them all as one Delta
transaction with delta-rs. Until that commit succeeds no reader sees any of them; if it fails
they are removed, and anything a crash leaves behind is not in the log and is deleted by
``vacuum`` (full mode).

Reads hand Spark the exact Parquet files of the requested version. That is a correct Delta read
only while the table has no deletion vectors or column mapping; tables using either are refused
with ``UnsupportedTableFeatureError`` (delta-rs never writes them; delta-spark writes tables here
with deletion vectors disabled).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError as DeltaCommitFailed
from deltalake.exceptions import DeltaError
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    Transaction,
    create_table_with_add_actions,
)

from recsys_spark.errors import (
    CommitFailedError,
    SchemaMismatchError,
    TableNotFoundError,
    TableUnreadableError,
    UnsupportedTableFeatureError,
)
from recsys_spark.logs import get_logger, log_event
from recsys_spark.spark import literal_path
from recsys_spark.storage.base import (
    COMMIT_ATTEMPTS,
    FILE_LEVEL_UNSAFE_FEATURES,
    CommitResult,
    Idempotency,
    PartitionFilter,
    TableEngine,
    WriteMode,
    check_files_exist,
    check_layout,
    merge_predicate,
)

if TYPE_CHECKING:
    import pyarrow.dataset
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

log = get_logger("storage.delta_rs")

STAGING_DIR = "_staging"
_COMMIT_INFO_FIELDS = {
    "timestamp", "operation", "operationParameters", "operationMetrics", "engineInfo",
    "clientVersion", "version", "readVersion", "isBlindAppend", "userMetadata",
    "isolationLevel", "txnId", "inCommitTimestamp",  # delta-spark's
}
USER_METADATA = "userMetadata"
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_STRING_STATS_PREFIX = 32
_MAX_CHAR = "\U0010ffff"  # sorts after every character: a cut max stays an upper bound


class DeltaRsEngine(TableEngine):
    """Spark computes and writes Parquet; delta-rs owns the Delta log."""

    name = "delta-rs"

    def __init__(self, spark: SparkSession) -> None:
        self.spark = spark

    # --- metadata ---------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return _has_log(path)

    def version(self, path: str) -> int:
        return self._open(path).version()

    def transaction_version(self, path: str, app_id: str) -> int | None:
        return self._open(path).transaction_version(app_id) if self.exists(path) else None

    def history(self, path: str, limit: int | None = None) -> list[dict[str, Any]]:
        return self._open(path).history(limit)

    def commit_metadata(self, path: str) -> dict[int, dict[str, str]]:
        history = self._open(path).history()
        return {int(commit["version"]): _recorded(commit) for commit in history if "version" in commit}

    # --- reads ------------------------------------------------------------------------------

    def read(
        self, path: str, *, version: int | None = None, timestamp: datetime | None = None
    ) -> DataFrame:
        table = self._open(path, version=version)
        if timestamp is not None:
            created = min(int(c["timestamp"]) for c in table.history() if "timestamp" in c)
            if timestamp.timestamp() * 1000 < created:  # delta-rs would give version 0 instead
                raise TableNotFoundError(
                    f"table {path} did not exist at {timestamp.isoformat()} (first commit "
                    f"{datetime.fromtimestamp(created / 1000, UTC).isoformat()})"
                )
            table.load_as_version(timestamp)
        check_readable_features(table, path)
        schema = spark_schema(table)
        files = data_files(table)
        check_files_exist(path, table.version(), files, latest=version is None and timestamp is None)
        if not files:
            return self.spark.createDataFrame([], schema)
        # basePath keeps the partition columns, which live in folder names, not in the files.
        df = self.spark.read.schema(schema).option("basePath", path).parquet(*map(literal_path, files))
        # Quoted: a name may hold a dot ("price.eur"), which Spark would read as a struct field.
        return df.select(*(f"`{name.replace('`', '``')}`" for name in schema.fieldNames()))

    # --- writes -----------------------------------------------------------------------------

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
        existing = self._open(path) if self.exists(path) else None
        if existing is not None:
            replayed = _replayed(existing, idempotency)
            if replayed is not None:
                return replayed
            # An overwrite of selected partitions keeps the others: it must keep their schema.
            keep_schema = mode == "append" or bool(partition_filters)
            _check_layout(existing, df.schema, partition_by, keep_schema=keep_schema)
        staging = Path(path) / STAGING_DIR / uuid.uuid4().hex
        published: list[Path] = []
        try:
            df.write.mode("errorifexists").partitionBy(*partition_by).parquet(str(staging))
            published_actions = (_publish(Path(path), staging, staged, published)
                                 for staged in sorted(staging.rglob("*.parquet")))
            actions = [a for a in published_actions if a is not None]
            if partition_filters:
                _check_within_filters(actions, partition_filters)
            properties = _commit_properties(idempotency, commit_info)
            schema = DeltaSchema.from_arrow(_nullable_arrow_schema(df.schema))
            if existing is None:
                create_table_with_add_actions(
                    path,
                    schema,
                    actions,
                    mode="error",
                    partition_by=list(partition_by) or None,
                    commit_properties=properties,
                )
            elif actions or mode == "overwrite" or idempotency is not None:
                def commit(table: DeltaTable) -> None:
                    table.create_write_transaction(
                        list(actions),
                        mode=mode,
                        # Appends keep the table's schema; a full overwrite may replace it.
                        schema=table.schema() if mode == "append" or partition_filters else schema,
                        partition_by=list(partition_by) or None,
                        partition_filters=_delta_rs_filters(partition_filters),
                        commit_properties=properties,
                    )

                replayed = self._on_newest_snapshot(path, idempotency, commit)
                if replayed is not None:  # an earlier attempt of this run committed meanwhile
                    _remove_files(published)
                    return replayed
        except (DeltaCommitFailed, DeltaError, OSError) as exc:
            _remove_files(published)
            raise CommitFailedError(f"writing {path} failed, nothing was committed: {exc}") from exc
        except BaseException:
            _remove_files(published)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty_dir(staging.parent)
        version = DeltaTable(path).version()
        rows = sum(json.loads(a.stats)["numRecords"] for a in actions)
        log_event(log, "delta.write", table=path, mode=mode, version=version, rows=rows,
                  files=len(actions))
        return CommitResult(version=version, rows_written=rows, files_added=len(actions))

    def append_arrow(
        self,
        table: pa.Table,
        path: str,
        *,
        partition_by: Sequence[str],
        idempotency: Idempotency | None,
        commit_info: dict[str, str],
    ) -> CommitResult:
        existing = self._open(path)
        replayed = _replayed(existing, idempotency)
        if replayed is not None:
            return replayed
        current = existing.metadata().partition_columns
        if list(partition_by) != list(current):
            raise SchemaMismatchError(
                f"table {path} is partitioned by {current}, the write asked for {list(partition_by)}"
            )
        source = _conform(table, existing, f"append to {path}")
        if source.num_rows == 0 and idempotency is None:
            return CommitResult(version=existing.version(), rows_written=0)
        properties = _commit_properties(idempotency, commit_info)
        try:
            if source.num_rows:
                write_deltalake(existing, source, mode="append", commit_properties=properties)
                version = existing.version()  # this commit's, even if another writer follows
            else:  # still commit, so the transaction (app id, batch) is recorded
                existing.create_write_transaction([], mode="append", schema=existing.schema(),
                                                  partition_by=list(current) or None,
                                                  commit_properties=properties)
                version = DeltaTable(path).version()
        except (DeltaCommitFailed, DeltaError, OSError) as exc:
            raise CommitFailedError(f"appending to {path} failed, nothing was committed: {exc}") from exc
        log_event(log, "delta.write", table=path, mode="append", version=version, rows=source.num_rows,
                  files=None, via="arrow")
        return CommitResult(version=version, rows_written=source.num_rows)

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
        """MERGE ``df`` into the table on ``keys``.

        The source rows travel to the driver as Arrow (delta-rs merges in-process), so upserts are
        for incremental batches — new dictionary entries, a micro-batch's users, run records —
        not for rewriting large tables; use ``write`` for those.
        """
        table = self._open(path)
        replayed = _replayed(table, idempotency)
        if replayed is not None:
            return replayed
        source = _conform(df if isinstance(df, pa.Table) else df.toArrow(), table, f"upsert into {path}")
        if source.num_rows == 0:  # nothing to merge; an empty commit still records the transaction
            return self.append_arrow(source, path, partition_by=table.metadata().partition_columns,
                                     idempotency=idempotency, commit_info=commit_info)
        metrics: dict[str, Any] = {}

        def merge(target: DeltaTable) -> None:
            metrics.update(
                target.merge(
                    source,
                    predicate=merge_predicate(keys),
                    source_alias="s",
                    target_alias="t",
                    commit_properties=_commit_properties(idempotency, commit_info),
                )
                .when_matched_update_all(predicate=update_condition)
                .when_not_matched_insert_all()
                .execute()
            )
            metrics["version"] = target.version()

        try:
            # the table was opened (and checked for a replay) just above: the stream's hot path
            replayed = self._on_newest_snapshot(path, idempotency, merge, fresh=table)
        except (DeltaCommitFailed, DeltaError) as exc:
            raise CommitFailedError(f"upsert into {path} failed, nothing was committed: {exc}") from exc
        if replayed is not None:
            return replayed
        rows = int(metrics.get("num_target_rows_inserted", 0)) + int(
            metrics.get("num_target_rows_updated", 0)
        )
        return CommitResult(version=metrics["version"], rows_written=rows)

    def delete(self, path: str, predicate: str) -> CommitResult:
        table = self._open(path)
        metrics = table.delete(predicate)
        return CommitResult(
            version=table.version(), rows_deleted=int(metrics.get("num_deleted_rows", 0))
        )

    # --- maintenance ------------------------------------------------------------------------

    def optimize(self, path: str) -> dict[str, Any]:
        return dict(self._open(path).optimize.compact())

    def vacuum(self, path: str, retention_hours: float) -> list[str]:
        table = self._open(path)
        removed = table.vacuum(
            retention_hours=math.ceil(retention_hours),  # never younger than asked
            dry_run=False,
            enforce_retention_duration=False,
            full=True,  # also orphans: files a crashed write left behind, never committed
        )
        return removed + _remove_stale_staging(Path(path), retention_hours)

    # --- helpers ----------------------------------------------------------------------------

    def _on_newest_snapshot(
        self, path: str, idempotency: Idempotency | None, commit: Callable[[DeltaTable], None],
        *, fresh: DeltaTable | None = None,
    ) -> CommitResult | None:
        """``commit(table)`` on the table's newest snapshot, again on a newer one when a
        concurrent commit conflicts with it; the replayed result instead if this transaction
        (``idempotency``) was committed meanwhile.

        delta-rs retries commits that merely raced; a logical conflict ("a concurrent
        transaction deleted data this operation read") it raises. Such conflicts are routine
        here: score-batch replaces the batch partition of serving/recommendations while the
        nearline query MERGEs into it every second, and a snapshot taken before a long Spark
        job is stale by commit time. Re-reading just before committing narrows the window to
        milliseconds; the few attempts cover the rest. ``fresh``: a snapshot the caller has just
        opened (and checked for a replay), used for the first attempt instead of opening another.
        """
        attempt = 1
        table = fresh
        while True:
            if table is None:
                table = self._open(path)
                replayed = _replayed(table, idempotency)
                if replayed is not None:
                    return replayed
            try:
                commit(table)
                return None
            except DeltaCommitFailed as exc:
                if attempt == COMMIT_ATTEMPTS:
                    raise
                log_event(log, "delta.commit_conflict", table=path, attempt=attempt, error=str(exc)[:300])
                time.sleep(0.1 * attempt)
                attempt += 1
                table = None

    def _open(self, path: str, *, version: int | None = None) -> DeltaTable:
        return open_delta(path, version=version)


def open_delta(path: str, *, version: int | None = None) -> DeltaTable:
    """The Delta table at ``path`` (as of ``version``).

    Raises:
        TableNotFoundError: there is no table at ``path``.
        TableUnreadableError: its log is damaged (one line naming the table, the newest
            version in its log and the cause, instead of delta-rs's traceback).
    """
    try:
        return DeltaTable(path, version=version)
    except Exception as exc:  # delta-rs raises TableNotFoundError or a generic DeltaError
        if not _has_log(path):
            raise TableNotFoundError(f"no Delta table at {path}") from exc
        newest = _newest_logged(path)
        if version is not None and isinstance(newest, int) and version > newest:
            raise TableNotFoundError(f"table {path} has no version {version} (latest {newest})") from exc
        raise TableUnreadableError(
            f"table {path} cannot be read (newest commit in its log: v{newest}): its Delta log is "
            f"damaged: {_first_line(exc)}"
        ) from exc


def check_readable_features(table: DeltaTable, path: str) -> None:
    """Refuse a table whose files are not its rows (deletion vectors, column mapping)."""
    unsafe = set(table.protocol().reader_features or []).intersection(FILE_LEVEL_UNSAFE_FEATURES)
    if unsafe:
        raise UnsupportedTableFeatureError(
            f"table {path} uses {', '.join(sorted(unsafe))}; read it with storage.engine=delta-spark"
        )


def _has_log(path: str) -> bool:
    if "://" in path and not path.startswith("file://"):
        return DeltaTable.is_deltatable(path)
    log_dir = Path(path.removeprefix("file://")) / "_delta_log"
    return log_dir.is_dir() and any(log_dir.glob("*.json"))


def _newest_logged(path: str) -> int | str:
    commits = [int(p.stem) for p in (Path(path.removeprefix("file://")) / "_delta_log").glob("*.json")
               if p.stem.isdigit()]
    return max(commits) if commits else "?"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def data_files(table: DeltaTable, **pruning: Any) -> list[str]:
    """Paths of the table's data files (``pruning``: ``file_uris``' keyword arguments).

    delta-rs spells a local table's files with the table folder percent-encoded ("/my%20lake/..")
    but the rest as on disk; Spark and pyarrow take that literally. Such paths get the folder's
    real name back; remote URIs are left as they are.
    """
    uris = table.file_uris(**pruning)
    location = urlparse(table.table_uri)
    if location.scheme != "file" or unquote(location.path) == location.path:
        return uris
    encoded, plain = location.path.rstrip("/") + "/", unquote(location.path).rstrip("/") + "/"
    return [plain + uri[len(encoded):] if uri.startswith(encoded) else uri for uri in uris]


def arrow_dataset(table: DeltaTable) -> pyarrow.dataset.Dataset:
    """``table`` (at its loaded version) as a pyarrow dataset, for reads outside Spark.

    A local table is read through Arrow's own file system. deltalake's default one is Python
    code that Arrow's I/O threads call back into, and a read-ahead still in flight when the
    interpreter exits aborts the process ("terminate called without an active exception",
    exit 134): 4 and 3 of 20 runs of a script reading a 250k-user gold/user_sequences on a busy
    host, against 0 of 20 (twice) this way.
    """
    location = urlparse(table.table_uri)
    if location.scheme not in ("", "file"):
        return table.to_pyarrow_dataset()
    folder = pa_fs.SubTreeFileSystem(unquote(location.path), pa_fs.LocalFileSystem())
    return table.to_pyarrow_dataset(filesystem=folder)


def spark_schema(table: DeltaTable) -> StructType:
    """The table's schema as a Spark ``StructType`` (Delta's schema JSON is Spark's format)."""
    from pyspark.sql.types import StructType

    return StructType.fromJson(json.loads(table.schema().to_json()))


def _replayed(table: DeltaTable, idempotency: Idempotency | None) -> CommitResult | None:
    if idempotency is None:
        return None
    done = table.transaction_version(idempotency.app_id)
    if done is not None and done >= idempotency.version:
        log_event(log, "delta.write.skipped", table=table.table_uri, app_id=idempotency.app_id,
                  txn_version=idempotency.version)
        return CommitResult(version=table.version(), skipped=True)
    return None


def _commit_properties(
    idempotency: Idempotency | None, commit_info: dict[str, str]
) -> CommitProperties:
    transactions = (
        [Transaction(app_id=idempotency.app_id, version=idempotency.version)]
        if idempotency is not None
        else None
    )
    # As Delta's userMetadata (a JSON object), which the delta-spark engine reads back too.
    recorded = {USER_METADATA: json.dumps(commit_info)} if commit_info else None
    return CommitProperties(custom_metadata=recorded, app_transactions=transactions)


def _recorded(commit: dict[str, Any]) -> dict[str, str]:
    """What ``commit_info`` recorded in a commit: its userMetadata object, or (tables written
    before the platform used userMetadata) the keys delta-rs put beside commitInfo's own fields."""
    try:
        user = json.loads(commit.get(USER_METADATA) or "null")
    except ValueError:  # someone else's free-text userMetadata
        user = None
    if isinstance(user, dict):
        return {k: str(v) for k, v in user.items()}
    return {k: str(v) for k, v in commit.items() if k not in _COMMIT_INFO_FIELDS}


def _conform(source: pa.Table, table: DeltaTable, what: str) -> pa.Table:
    """``source`` with the table's columns, in its order and types."""
    target = pa.schema(table.schema().to_arrow())
    extra = sorted(set(source.column_names) - set(target.names))
    if extra:
        raise SchemaMismatchError(f"{what}: unexpected columns {extra}")
    try:
        return source.select(target.names).cast(target)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaMismatchError(f"{what}: {exc}") from exc


def _check_layout(
    table: DeltaTable, schema: StructType, partition_by: Sequence[str], *, keep_schema: bool
) -> None:
    check_layout(table.table_uri, spark_schema(table), table.metadata().partition_columns, schema,
                 partition_by, keep_schema=keep_schema)


def _nullable_arrow_schema(schema: StructType) -> pa.Schema:
    """Arrow schema of ``schema`` with every field, element and value nullable.

    Spark marks computed columns NOT NULL; carried into the Delta schema that would make a later
    append with a null fail, so tables are declared nullable throughout.
    """
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow = to_arrow_schema(schema, timezone="UTC")
    return pa.schema([_nullable_field(f) for f in arrow])


def _nullable_field(field: pa.Field) -> pa.Field:
    return field.with_type(_nullable_type(field.type)).with_nullable(True)


def _nullable_type(data_type: pa.DataType) -> pa.DataType:
    if pa.types.is_map(data_type):
        return pa.map_(data_type.key_type, _nullable_field(data_type.item_field).type)
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return pa.list_(_nullable_field(data_type.value_field))
    if pa.types.is_struct(data_type):
        return pa.struct([_nullable_field(data_type.field(i)) for i in range(data_type.num_fields)])
    return data_type


def _publish(table_root: Path, staging: Path, staged: Path, published: list[Path]) -> AddAction | None:
    """Move one staged file into the table under a unique name and describe it for the log."""
    relative = staged.relative_to(staging)
    metadata = pq.ParquetFile(staged).metadata
    if metadata.num_rows == 0:
        return None  # Spark writes a schema-only file for an empty unpartitioned frame
    target = table_root / relative.parent / f"{staging.name[:12]}-{relative.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
    published.append(target)
    stat = target.stat()
    return AddAction(
        path=str(target.relative_to(table_root)),  # delta-rs encodes it for the log
        size=stat.st_size,
        partition_values=_partition_values(relative),
        modification_time=int(stat.st_mtime * 1000),
        data_change=True,
        stats=_file_stats(metadata),
    )


def _partition_values(relative: Path) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for folder in relative.parent.parts:
        key, _, raw = folder.partition("=")
        # Spark escapes partition folder names with %XX; Delta wants the plain value.
        values[unquote(key)] = None if raw == _HIVE_NULL else unquote(raw)
    return values


def _file_stats(metadata: pq.FileMetaData) -> str:
    """Delta file statistics from the Parquet footer: row count, nulls, min/max where sound.

    delta-rs skips a file whose column has no min/max as if nothing in it could match a filter
    on that column, while a file without statistics is always read. So either every plain
    column gets bounds that enclose its values — strings cut to 32 characters (as delta-spark
    does; the max then rounded up), decimals as the JSON numbers that spell them exactly,
    timestamps rounded outward to milliseconds, the precision Delta stores — or, when one
    cannot (the footer lacks a column's statistics, as Spark's writer does for values of a few
    KB; NaN, long decimals, binary), the file gets its row count only. Nested columns get none:
    no reader filters on them.
    """
    rows = {"numRecords": metadata.num_rows}
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    schema = metadata.schema
    top_level = set(schema.to_arrow_schema().names)
    for col in range(metadata.num_columns):
        column = schema.column(col)
        if column.path not in top_level:
            continue  # nested leaves: no stats
        found = _column_stats(metadata, col)
        if found is None:
            return json.dumps(rows)
        nulls[column.path], bounds = found
        if bounds is not None:
            mins[column.path], maxs[column.path] = bounds
    return json.dumps({**rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def _column_stats(metadata: pq.FileMetaData, col: int) -> tuple[int, tuple[Any, Any] | None] | None:
    """(null count, rendered bounds; ``None`` when every value is null) of one column, or
    ``None`` when the footer cannot vouch for them."""
    nulls = 0
    lows, highs = [], []
    for rg in range(metadata.num_row_groups):
        group = metadata.row_group(rg)
        stats = group.column(col).statistics
        if stats is None or not stats.has_null_count:
            return None
        nulls += stats.null_count
        if stats.has_min_max:
            lows.append(stats.min)
            highs.append(stats.max)
        elif stats.null_count != group.num_rows:
            return None  # values without bounds
    if not lows:
        return nulls, None
    bounds = _render_bounds(min(lows), max(highs))
    return None if bounds is None else (nulls, bounds)


def _render_bounds(low: Any, high: Any) -> tuple[Any, Any] | None:
    if isinstance(low, bool | int):
        return low, high
    if isinstance(low, float):
        return None if math.isnan(low) or math.isnan(high) else (low, high)
    if isinstance(low, Decimal):
        exact = all(Decimal(repr(float(v))) == v for v in (low, high))
        return (float(low), float(high)) if exact else None
    if isinstance(low, str):
        cut = _STRING_STATS_PREFIX
        return low[:cut], high if len(high) <= cut else high[:cut] + _MAX_CHAR
    if isinstance(low, datetime):
        # Naive values are timestamp_ntz wall times: UTC by convention, not the machine's zone.
        low, high = (v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC) for v in (low, high))
        floor = low.replace(microsecond=low.microsecond // 1000 * 1000)
        ceil = high
        if ceil.microsecond % 1000:
            ceil = ceil.replace(microsecond=ceil.microsecond // 1000 * 1000) + timedelta(milliseconds=1)
        return _iso_millis(floor), _iso_millis(ceil)
    if isinstance(low, date):
        return low.isoformat(), high.isoformat()
    return None


def _iso_millis(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _check_within_filters(actions: list[AddAction], filters: Sequence[PartitionFilter]) -> None:
    """An overwrite of selected partitions must not add rows outside those partitions."""
    for action in actions:
        for column, op, value in filters:
            allowed = set(_partition_texts(op, value))
            if action.partition_values.get(column) not in allowed:
                raise ValueError(
                    f"data has {column}={action.partition_values.get(column)!r}, outside the "
                    f"partitions being replaced ({sorted(allowed)})"
                )


def _delta_rs_filters(filters: Sequence[PartitionFilter] | None) -> list[tuple[str, str, Any]] | None:
    if not filters:
        return None
    rendered: list[tuple[str, str, Any]] = []
    for column, op, value in filters:
        texts = _partition_texts(op, value)
        rendered.append((column, op, texts if op == "in" else texts[0]))
    return rendered


def _partition_texts(op: str, value: Any) -> list[str]:
    """Filter values as partition folders spell them (Spark writes booleans as true/false)."""
    values = value if op == "in" else [value]
    return [str(v).lower() if isinstance(v, bool) else str(v) for v in values]


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _remove_empty_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: another write is staging concurrently
        path.rmdir()


def _remove_stale_staging(table_root: Path, retention_hours: float) -> list[str]:
    """Staging folders of writes that crashed before their commit, older than the retention."""
    root = table_root / STAGING_DIR
    if not root.is_dir():
        return []
    cutoff = time.time() - retention_hours * 3600
    removed = []
    for folder in root.iterdir():
        if folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    _remove_empty_dir(root)
    return removed
