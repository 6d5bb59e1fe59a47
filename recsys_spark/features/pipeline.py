"""Silver -> gold feature build: ``recsys features`` and ``jobs/build_features.py``.

Everything is computed relative to one as-of time (default: the newest event) from one version
of ``silver/events``; both are recorded — in every gold table's commit metadata and in
``ops/feature_runs`` — so a training set can be rebuilt exactly with
``recsys features --silver-version V --as-of T``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark.config import FeatureSettings, Settings
from recsys_spark.constants import (
    BEHAVIOR,
    CATEGORY_ID,
    EVENT_TS,
    FORMAT_KEY,
    GOLD_ITEM_FEATURES,
    GOLD_USER_SEQUENCES,
    ITEM_ID,
    ITEM_IDX,
    OPS_FEATURE_RUNS,
    OPS_INGEST_RUNS,
    SILVER_EVENTS,
    SPLIT,
    USER_ID,
    USER_IDX,
    SplitProtocol,
)
from recsys_spark.errors import ConfigError, InputDataError
from recsys_spark.features.aggregates import build_item_features
from recsys_spark.features.sequences import (
    cluster_user_events,
    derive_user_tables,
    leave_one_out_table,
    temporal_table,
    user_features_table,
    user_sequences_table,
    user_table,
)
from recsys_spark.logs import get_logger, log_event, log_event_at, timed
from recsys_spark.records import GoldCommit
from recsys_spark.spark import one_row
from recsys_spark.storage import Lakehouse

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = get_logger("features")

FEATURE_RUNS_SCHEMA = T.StructType(
    [
        T.StructField("run_id", T.StringType()),
        T.StructField("created_at", T.TimestampType()),
        T.StructField("as_of", T.TimestampType()),
        T.StructField("protocol", T.StringType()),
        T.StructField("validation_start", T.TimestampType()),
        T.StructField("test_start", T.TimestampType()),
        T.StructField("source_versions", T.MapType(T.StringType(), T.LongType())),
        T.StructField("output_versions", T.MapType(T.StringType(), T.LongType())),
        T.StructField("rows", T.MapType(T.StringType(), T.LongType())),
        T.StructField("num_users", T.LongType()),
        T.StructField("num_items", T.LongType()),
        T.StructField("settings", T.StringType()),
    ]
)


@dataclass
class FeatureReport:
    run_id: str
    as_of: datetime
    protocol: SplitProtocol
    validation_start: datetime | None
    test_start: datetime | None
    source_versions: dict[str, int]
    num_users: int
    num_items: int
    output_versions: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingested_formats(lake: Lakehouse, silver_version: int) -> set[str]:
    """Input formats of the ingest runs that made ``silver_version`` (or older): later runs
    must not change how that version is split, or a rebuild would differ.

    Each silver commit names its format, so the answer does not wait for the run's record in
    ops/ingest_runs (written last); that record still speaks for commits older than the
    format in the commit, and for those a vacuum's checkpoint took out of the log.
    """
    formats = {meta[FORMAT_KEY] for version, meta in lake.commit_metadata_by_version(SILVER_EVENTS).items()
               if version <= silver_version and FORMAT_KEY in meta}
    if lake.exists(OPS_INGEST_RUNS):
        rows = (
            lake.read(OPS_INGEST_RUNS)
            .filter(F.col("status") == "succeeded")
            .filter(F.col("table_versions")[SILVER_EVENTS] <= silver_version)
            .select("format")
            .distinct()
            .collect()
        )
        formats |= {r["format"] for r in rows}
    return formats


def resolve_protocol(settings: FeatureSettings, formats: set[str]) -> SplitProtocol:
    """``auto``: leave-one-out when every ingested input was a ``sequences`` file (the
    benchmark format), temporal for event logs."""
    if settings.split.protocol != "auto":
        return settings.split.protocol
    return "leave-one-out" if formats == {"sequences"} else "temporal"


def resolve_collapse(settings: FeatureSettings, formats: set[str]) -> bool:
    """``auto``: collapse repeated consecutive items in event logs, keep benchmark sequences."""
    if settings.collapse_repeats != "auto":
        return settings.collapse_repeats == "always"
    return formats != {"sequences"}


def temporal_cutoffs(
    settings: FeatureSettings, first_event: datetime, as_of: datetime
) -> tuple[datetime, datetime]:
    """Validation and test window starts: from config, else the last fractions of the span."""
    span = as_of - first_event
    test_start = settings.split.test_start or as_of - span * settings.split.test_fraction
    validation_start = (
        settings.split.validation_start or test_start - span * settings.split.validation_fraction
    )
    # Whole seconds: readable cut-offs in reports and commits (the kernels compare microseconds).
    validation_start = validation_start.replace(microsecond=0)
    test_start = test_start.replace(microsecond=0)
    if not first_event < validation_start < test_start <= as_of:
        raise ConfigError(
            f"temporal split needs first event ({first_event}) < validation_start "
            f"({validation_start}) < test_start ({test_start}) <= as_of ({as_of})"
        )
    return validation_start, test_start


@dataclass(frozen=True)
class _Plan:
    """What one features run builds from: the events up to the as-of time and the decisions
    taken from them (catalogue size, split protocol and cut-offs, collapsing)."""

    events: DataFrame
    silver_version: int
    as_of: datetime
    num_items: int
    protocol: SplitProtocol
    collapse: bool
    validation_start: datetime | None
    test_start: datetime | None


def build_features(
    spark: SparkSession,
    lake: Lakehouse,
    settings: Settings,
    *,
    silver_version: int | None = None,
) -> FeatureReport:
    """Build the four gold tables from ``silver/events`` (latest, or ``silver_version``).

    Raises:
        TableNotFoundError: nothing has been ingested yet.
        InputDataError: silver holds no events at or before the as-of time.
        ConfigError: the temporal cut-offs do not fit the data.
    """
    plan = _plan(lake, settings.features, lake.version(SILVER_EVENTS) if silver_version is None else silver_version)
    report = FeatureReport(
        run_id=f"features-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
        as_of=plan.as_of,
        protocol=plan.protocol,
        validation_start=plan.validation_start,
        test_start=plan.test_start,
        source_versions={SILVER_EVENTS: plan.silver_version},
        num_users=0,
        num_items=plan.num_items,
    )
    log_event(log, "features.start", run_id=report.run_id, as_of=plan.as_of.isoformat(),
              protocol=plan.protocol, silver_version=plan.silver_version)
    _write_gold(lake, settings.features, plan, report)
    report.num_users = report.rows[GOLD_USER_SEQUENCES]
    _record_run(spark, lake, report, settings.features)
    log_event(log, "features.done", run_id=report.run_id, rows=report.rows,
              versions=report.output_versions)
    return report


def _plan(lake: Lakehouse, cfg: FeatureSettings, version: int) -> _Plan:
    events = lake.read(SILVER_EVENTS, version=version).select(
        USER_IDX, USER_ID, ITEM_IDX, ITEM_ID, CATEGORY_ID, BEHAVIOR, EVENT_TS
    )
    # Epoch micros, not timestamps: collected timestamps come back in the driver's local zone.
    bounds = one_row(events.agg(
        F.unix_micros(F.min(EVENT_TS)).alias("first"),
        F.unix_micros(F.max(EVENT_TS)).alias("last"),
        F.max(ITEM_IDX).alias("top_item"),
    ))
    if bounds["last"] is None:
        raise InputDataError(f"{SILVER_EVENTS} (version {version}) holds no events")
    first_event, last_event = _from_micros(bounds["first"]), _from_micros(bounds["last"])
    as_of = cfg.as_of or last_event
    # Dictionary entries are made for exactly the items of clean events, so the catalogue
    # size follows from the events version alone and a rebuild gets the same one.
    num_items = int(bounds["top_item"]) + 1
    if as_of < first_event:
        raise InputDataError(f"as_of {as_of} is before the first event ({first_event})")
    events = events.filter(F.col(EVENT_TS) <= F.lit(as_of))
    # The catalogue ends at the largest item index seen by as_of; a smaller index first seen
    # later (indices follow ids within an ingest run) stays an unused slot, never a target.
    if cfg.as_of is not None:
        num_items = int(one_row(events.agg(F.max(ITEM_IDX)))[0] or -1) + 1
    formats = ingested_formats(lake, version)
    protocol = resolve_protocol(cfg, formats)
    validation_start = test_start = None
    if protocol == "temporal":
        validation_start, test_start = temporal_cutoffs(cfg, first_event, as_of)
        if last_event < test_start:  # an as-of past the data leaves the end windows empty
            log_event_at(log, logging.WARNING, "features.empty_windows", last_event=last_event.isoformat(),
                         validation_start=validation_start.isoformat(), test_start=test_start.isoformat(),
                         hint="no events in the test window (and none in validation if last_event "
                         "< validation_start); move features.as_of or the cut-offs")
    return _Plan(events, version, as_of, num_items, protocol, resolve_collapse(cfg, formats), validation_start,
                 test_start)


def _write_gold(lake: Lakehouse, cfg: FeatureSettings, plan: _Plan, report: FeatureReport) -> None:
    """The item table from the events, the three user tables from one shuffle of them; every
    commit records the run (``GoldCommit``)."""
    commit_info = GoldCommit(report.run_id, plan.as_of, plan.protocol, report.source_versions,
                             plan.num_items).commit_info()

    def write(df: DataFrame, table: str, partition_by: tuple[str, ...] = ()) -> None:
        with timed(log, "features.write", table=table) as out:
            result = lake.write(df, table, mode="overwrite", partition_by=partition_by,
                                commit_info=commit_info)
            out.update(rows=result.rows_written, version=result.version)
        report.output_versions[table] = result.version
        report.rows[table] = result.rows_written or 0

    write(build_item_features(plan.events, as_of=plan.as_of, windows_days=cfg.windows_days), GOLD_ITEM_FEATURES)
    if plan.validation_start is not None and plan.test_start is not None:
        examples = temporal_table(validation_start=plan.validation_start, test_start=plan.test_start,
                                  max_length=cfg.max_sequence_length, collapse_repeats=plan.collapse)
    else:
        examples = leave_one_out_table(max_length=cfg.max_sequence_length, collapse_repeats=plan.collapse)
    user_tables = [
        user_features_table(as_of=plan.as_of, windows_days=cfg.windows_days, top_categories=cfg.top_categories),
        user_sequences_table(max_length=cfg.max_sequence_length, collapse_repeats=plan.collapse),
        examples,
    ]
    with lake.scratch(f"features/{report.run_id}") as scratch:
        # The one user-side shuffle and one Python pass derive all three tables; their rows
        # (one per user or example, far fewer than events) are staged once and split.
        with timed(log, "features.user_tables", run_id=report.run_id):
            derived = scratch.put(derive_user_tables(cluster_user_events(plan.events), user_tables), "user_tables")
        for table in user_tables:
            write(user_table(derived, table), table.name,
                  partition_by=(SPLIT,) if table is examples else ())


def _from_micros(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, UTC)


def _record_run(spark: SparkSession, lake: Lakehouse, report: FeatureReport, cfg: FeatureSettings) -> None:
    row = (
        report.run_id,
        datetime.now(UTC),
        report.as_of,
        report.protocol,
        report.validation_start,
        report.test_start,
        report.source_versions,
        report.output_versions,
        report.rows,
        report.num_users,
        report.num_items,
        cfg.model_dump_json(),
    )
    record = spark.createDataFrame([row], FEATURE_RUNS_SCHEMA).coalesce(1)
    report.output_versions[OPS_FEATURE_RUNS] = lake.write(record, OPS_FEATURE_RUNS).version
