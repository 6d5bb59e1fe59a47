"""Item feature table: windowed behaviour counts relative to an as-of time.

Takes silver events already cut at the as-of time (``event_ts <= as_of``), so no value can
depend on what happened later. (User-side tables come from ``features.sequences``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from recsys_spark.constants import (
    BEHAVIOR,
    BEHAVIORS,
    CATEGORY_ID,
    EVENT_TS,
    ITEM_ID,
    ITEM_IDX,
    LAST_EVENT_TS,
)

_DAY_MICROS = 86_400 * 1_000_000


def window_counts(
    as_of: datetime,
    windows_days: Sequence[int],
    *,
    col_behavior: str = BEHAVIOR,
    col_ts: str = EVENT_TS,
) -> dict[str, Column]:
    """Aggregates by name: ``<behavior>_<w>d`` counts events of each behaviour in the ``w`` days
    up to ``as_of``; ``<behavior>_total`` counts all of them."""
    # Microseconds: whole seconds would move an event a fraction of a second inside a window
    # onto its edge.
    age = F.unix_micros(F.lit(as_of)) - F.unix_micros(F.col(col_ts))
    columns: dict[str, Column] = {}
    for behavior in BEHAVIORS:
        is_behavior = F.col(col_behavior) == behavior
        for days in windows_days:
            columns[f"{behavior}_{days}d"] = F.count_if(is_behavior & (age < days * _DAY_MICROS))
        columns[f"{behavior}_total"] = F.count_if(is_behavior)
    return columns


def _rate(numerator: str, denominator: str) -> Column:
    return F.when(F.col(denominator) > 0, F.col(numerator) / F.col(denominator))


def build_item_features(
    events: DataFrame, *, as_of: datetime, windows_days: Sequence[int]
) -> DataFrame:
    """One row per item: windowed popularity per behaviour, conversion rate and category.

    Columns: item_idx, item_id, category_id (the item's latest), ``<behavior>_<w>d`` and
    ``<behavior>_total`` counts, total_events, last_event_ts, conversion_rate (buys per view).
    """
    return (
        events.groupBy(ITEM_IDX, ITEM_ID)
        .agg(
            # the latest known category: an event without one (jsonl makes it optional)
            # does not erase it (max_by skips rows whose ordering value is null)
            F.max_by(CATEGORY_ID, F.when(F.col(CATEGORY_ID).isNotNull(), F.col(EVENT_TS))).alias(CATEGORY_ID),
            *[column.alias(name) for name, column in window_counts(as_of, windows_days).items()],
            F.count("*").alias("total_events"),
            F.max(EVENT_TS).alias(LAST_EVENT_TS),
        )
        .withColumn("conversion_rate", _rate("buy_total", "pv_total"))
    )
