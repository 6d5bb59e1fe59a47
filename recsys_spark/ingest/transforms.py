"""Pure DataFrame transforms of the ingest: event keys, duplicates, dictionaries, table rows."""

from __future__ import annotations

from datetime import datetime
from functools import reduce

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark.config import IngestSettings
from recsys_spark.constants import (
    BEHAVIOR,
    CATEGORY_ID,
    DETAIL,
    EVENT_DATE,
    EVENT_ID,
    EVENT_TS,
    EXTRAS,
    INGEST_DATE,
    INGESTED_AT,
    ITEM_ID,
    ITEM_IDX,
    RAW,
    REASON,
    RUN_ID,
    SOURCE_FILE,
    USER_ID,
    USER_IDX,
)
from recsys_spark.ingest.parse import storable_text

# Ranks rows that share an event key; a hash of the raw line, so the raw text can be dropped
# before the shuffle.
TIEBREAK = "_tiebreak"

# No event_key column: the key is a function of these columns (``event_key()``), and
# building its string for every event was a third of the silver write.
SILVER_EVENT_COLUMNS: tuple[str, ...] = (
    EVENT_ID,
    USER_ID,
    ITEM_ID,
    CATEGORY_ID,
    BEHAVIOR,
    EVENT_TS,
    USER_IDX,
    ITEM_IDX,
    EXTRAS,
    SOURCE_FILE,
    RUN_ID,
    EVENT_DATE,
)


def event_key(
    *,
    col_event_id: str = EVENT_ID,
    col_user: str = USER_ID,
    col_item: str = ITEM_ID,
    col_behavior: str = BEHAVIOR,
    col_ts: str = EVENT_TS,
) -> Column:
    """The deduplication key: ``e:<event_id>`` when the source has one, else the natural key
    ``user:item:behaviour:epoch-micros``. Readable and collision-free, unlike a 64-bit hash.
    """
    natural = F.concat_ws(
        ":", F.col(col_user), F.col(col_item), F.col(col_behavior), F.unix_micros(F.col(col_ts))
    )
    return F.coalesce(F.concat(F.lit("e:"), F.col(col_event_id)), natural)


def event_key_hash() -> Column:
    """A 64-bit hash that is equal whenever ``event_key()`` is, from the typed columns: hashing
    two longs, a short string and a timestamp is much cheaper than building the key string."""
    natural = F.xxhash64(F.col(USER_ID), F.col(ITEM_ID), F.col(BEHAVIOR), F.col(EVENT_TS))
    # Not coalesce: Spark's xxhash64 skips null arguments instead of returning null.
    return F.when(F.col(EVENT_ID).isNotNull(), F.xxhash64(F.col(EVENT_ID))).otherwise(natural)


def repeated_key_hashes(events: DataFrame) -> DataFrame:
    """Hashes of the event keys that occur more than once (column ``_key_hash``).

    Duplicates are rare, so rather than sorting every event by its key, one hash aggregation
    finds the few repeated hashes; ``first_occurrences`` ranks only rows carrying one of them.
    """
    return (
        events.groupBy(event_key_hash().alias("_key_hash"))
        .count()
        .filter(F.col("count") > 1)
        .select("_key_hash")
    )


def first_occurrences(events: DataFrame, repeated: DataFrame, *, col_tiebreak: str = TIEBREAK) -> DataFrame:
    """One row per event key, given ``repeated_key_hashes(events)``. Among rows sharing a key
    the smallest ``col_tiebreak`` (a hash of the raw line) wins, so a rerun keeps the same row;
    ranking by the key string itself resolves hash collisions.
    """
    hashed = events.withColumn("_key_hash", event_key_hash())
    unique = hashed.join(repeated, "_key_hash", "left_anti")
    order = Window.partitionBy("_key").orderBy(F.col(col_tiebreak), F.col(SOURCE_FILE))
    winners = (
        hashed.join(repeated, "_key_hash", "left_semi")
        .withColumn("_key", event_key())
        .withColumn("_occurrence", F.row_number().over(order))
        .filter(F.col("_occurrence") == 1)
        .drop("_occurrence", "_key")
    )
    return unique.unionByName(winners).drop("_key_hash")


def drop_known(events: DataFrame, known: DataFrame | None) -> DataFrame:
    """Events whose ``event_key()`` no event of ``known`` (already-ingested events) has.

    Joined on the 64-bit key hash, and then on the key's own columns, so a hash collision
    never drops an event: the same key as ``event_key()`` without building its string.
    """
    if known is None:
        return events
    key_columns = (EVENT_ID, USER_ID, ITEM_ID, BEHAVIOR, EVENT_TS)
    known = known.select(
        event_key_hash().alias("_known_hash"), *[F.col(c).alias(f"_known_{c}") for c in key_columns]
    )

    def known_col(name: str) -> Column:
        return F.col(f"_known_{name}")

    same_natural_key = reduce(
        Column.__and__, [F.col(c) == known_col(c) for c in key_columns if c != EVENT_ID]
    )
    same_key = F.col(EVENT_ID).eqNullSafe(known_col(EVENT_ID)) & (
        F.col(EVENT_ID).isNotNull() | same_natural_key
    )
    hashed = events.withColumn("_key_hash", event_key_hash())
    condition = (F.col("_key_hash") == F.col("_known_hash")) & same_key
    return hashed.join(known, on=condition, how="left_anti").drop("_key_hash")


def new_index_entries(
    ids: DataFrame,
    index: DataFrame | None,
    *,
    col_id: str,
    col_idx: str,
    next_idx: int,
) -> DataFrame:
    """Dictionary rows for ids not yet in ``index``, numbered from ``next_idx`` in id order.

    Existing ids keep their index forever; new ones extend the range without gaps. Numbering
    needs one ordered pass over the *new* ids only (a single partition, small by nature).
    """
    new_ids = ids.select(col_id).distinct()
    if index is not None:
        new_ids = new_ids.join(index.select(col_id), on=col_id, how="left_anti")
    order = Window.orderBy(col_id)
    return new_ids.select(
        col_id, (F.row_number().over(order) - 1 + F.lit(next_idx)).cast("int").alias(col_idx)
    )


def with_indices(events: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """Attach the dense ``user_idx`` and ``item_idx`` of every event (inner joins: every id has
    an entry once the dictionaries are extended)."""
    return events.join(user_index.select(USER_ID, USER_IDX), USER_ID).join(
        item_index.select(ITEM_ID, ITEM_IDX), ITEM_ID
    )


def silver_rows(events: DataFrame, run_id: str) -> DataFrame:
    return events.select(
        *[c for c in SILVER_EVENT_COLUMNS if c not in (RUN_ID, EVENT_DATE)],
        F.lit(run_id).alias(RUN_ID),
        F.to_date(EVENT_TS).alias(EVENT_DATE),
    )


# What bronze and quarantine keep of a parsed line, before the run's lineage columns.
BRONZE_COLUMNS = (RAW, SOURCE_FILE)
QUARANTINE_COLUMNS = (RAW, SOURCE_FILE, REASON, DETAIL)


def lineage(run_id: str, at: datetime) -> dict[str, object]:
    """The columns every bronze and quarantine row carries: which run wrote it, and when."""
    return {RUN_ID: run_id, INGESTED_AT: at, INGEST_DATE: at.date()}


def _with_lineage(columns: tuple[str, ...], run_id: str, at: datetime) -> list[Column]:
    stamp = [F.lit(value).alias(name) for name, value in lineage(run_id, at).items()]
    return [*map(F.col, columns), *stamp]


def bronze_rows(raw: DataFrame, run_id: str, ingested_at: datetime) -> DataFrame:
    """Raw lines as read, with where they came from and which run read them. A line that is not
    UTF-8 is stored with U+FFFD replacements; its quarantine row keeps the exact bytes."""
    return raw.withColumn(RAW, storable_text(F.col(RAW))).select(
        *_with_lineage(BRONZE_COLUMNS, run_id, ingested_at)
    )


def quarantine_rows(parsed: DataFrame, run_id: str, quarantined_at: datetime) -> DataFrame:
    """Rows that failed validation: the raw line, its file, the reason code and a detail."""
    return parsed.filter(F.col(REASON).isNotNull()).select(
        *_with_lineage(QUARANTINE_COLUMNS, run_id, quarantined_at)
    )


def continue_sequences(parsed: DataFrame, last_times: DataFrame | None, settings: IngestSettings) -> DataFrame:
    """``sequences`` events of users silver already holds, moved to follow their newest event.

    The parser times each user's items from ``ingest.sequence_base_time`` on, one
    ``sequence_step_seconds`` apart (a user's later lines of the same input continue the
    earlier ones); a user already in silver (``last_times``: user -> newest event time) resumes
    one step after their newest event instead, so their items never interleave with, or repeat
    the times of, what was ingested before.
    """
    if last_times is None:
        return parsed
    base = F.lit(settings.sequence_base_time).cast("timestamp")
    resume = F.col("_last") + F.make_dt_interval(secs=F.lit(settings.sequence_step_seconds))
    shift = F.when(F.col("_last").isNotNull() & (resume > base), resume - base)
    known = last_times.select(F.col(USER_ID), F.col(EVENT_TS).alias("_last"))
    # the users of this input only: a broadcast-sized lookup, not a shuffle of silver
    users = parsed.filter(F.col(REASON).isNull()).select(USER_ID).distinct()
    known = known.join(users, USER_ID, "left_semi")
    moved = F.when(F.col(REASON).isNull() & shift.isNotNull(), F.col(EVENT_TS) + shift).otherwise(F.col(EVENT_TS))
    return parsed.join(known, USER_ID, "left").withColumn(EVENT_TS, moved).select(*parsed.columns)
