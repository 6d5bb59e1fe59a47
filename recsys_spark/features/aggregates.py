"""User and item feature tables: windowed behaviour counts relative to an as-of time.

Both functions take silver events already cut at the as-of time (``event_ts <= as_of``), so no
value can depend on what happened later.
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
    USER_ID,
    USER_IDX,
)

_DAY = 86_400


def window_counts(
    as_of: datetime,
    windows_days: Sequence[int],
    *,
    col_behavior: str = BEHAVIOR,
    col_ts: str = EVENT_TS,
) -> dict[str, Column]:
    """Aggregates by name: ``<behavior>_<w>d`` counts events of each behaviour in the ``w`` days
    up to ``as_of``; ``<behavior>_total`` counts all of them."""
    age = F.lit(as_of).cast("long") - F.col(col_ts).cast("long")
    columns: dict[str, Column] = {}
    for behavior in BEHAVIORS:
        is_behavior = F.col(col_behavior) == behavior
        for days in windows_days:
            columns[f"{behavior}_{days}d"] = F.count_if(is_behavior & (age < days * _DAY))
        columns[f"{behavior}_total"] = F.count_if(is_behavior)
    return columns


def _rate(numerator: str, denominator: str) -> Column:
    return F.when(F.col(denominator) > 0, F.col(numerator) / F.col(denominator))


def build_user_features(
    events: DataFrame,
    *,
    as_of: datetime,
    windows_days: Sequence[int],
    top_categories: int,
) -> DataFrame:
    """One row per user: windowed counts per behaviour, recency, category breadth and tastes.

    Columns: user_idx, user_id, ``<behavior>_<w>d`` and ``<behavior>_total`` counts,
    total_events, last_event_ts, recency_seconds, distinct_categories, view_to_buy_rate
    (buys per page view, null without views), top_categories (most frequent category ids).
    """
    counts = window_counts(as_of, windows_days)
    names = list(counts)
    # Two steps: per (user, category) first, so category tastes come from the same pass.
    per_category = events.groupBy(USER_IDX, USER_ID, CATEGORY_ID).agg(
        *[column.alias(name) for name, column in counts.items()],
        F.count("*").alias("_n"),
        F.max(EVENT_TS).alias("_last"),
    )
    # Most frequent first; ties broken by the smaller category id. collect_list skips nulls.
    ranked = F.sort_array(
        F.collect_list(
            F.when(F.col(CATEGORY_ID).isNotNull(), F.struct(-F.col("_n"), F.col(CATEGORY_ID)))
        )
    )
    users = per_category.groupBy(USER_IDX, USER_ID).agg(
        *[F.sum(n).alias(n) for n in names],
        F.sum("_n").alias("total_events"),
        F.max("_last").alias("last_event_ts"),
        F.count(CATEGORY_ID).alias("distinct_categories"),
        ranked.alias("_ranked"),
    )
    return users.select(
        USER_IDX,
        USER_ID,
        *names,
        "total_events",
        "last_event_ts",
        (F.lit(as_of).cast("long") - F.col("last_event_ts").cast("long")).alias("recency_seconds"),
        "distinct_categories",
        _rate("buy_total", "pv_total").alias("view_to_buy_rate"),
        F.transform(F.slice("_ranked", 1, top_categories), lambda x: x[CATEGORY_ID]).alias(
            "top_categories"
        ),
    )


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
            F.max_by(CATEGORY_ID, EVENT_TS).alias(CATEGORY_ID),
            *[column.alias(name) for name, column in window_counts(as_of, windows_days).items()],
            F.count("*").alias("total_events"),
            F.max(EVENT_TS).alias("last_event_ts"),
        )
        .withColumn("conversion_rate", _rate("buy_total", "pv_total"))
    )
