"""Per-user tables — user features, sequences, training examples — from one shuffle.

``collect_user_events`` groups each user's events into one row (the only shuffle); the builders
below run the vectorised kernels of ``features.kernels`` over those rows with ``mapInArrow``,
so the per-user work is array arithmetic in the Python workers, batched over many users.

Split protocols (``gold/training_examples``, partitioned by ``split``):

* ``leave-one-out`` — per user with at least 3 events: the last item is the test target, the
  second-to-last the validation target, the rest the training sequence. Validation histories end
  before their target; test histories include the validation item (as the published protocol).
  Users with fewer events contribute a training row only.
* ``temporal`` — two cut-off times. Training sequences hold events before ``validation_start``;
  validation targets are the distinct items of ``[validation_start, test_start)`` and test
  targets those of ``[test_start, as_of]``, each with the history before its window (possibly
  empty: a cold user).

Training rows keep ``max_length + 1`` events: a model predicts positions 2..L+1 from 1..L.
Every example has ``history_end_ts <= target_start_ts``, which the leakage test checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import partial

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from recsys_spark.constants import (
    BEHAVIOR,
    BEHAVIOR_CODES,
    CATEGORY_ID,
    EVENT_TS,
    ITEM_IDX,
    USER_ID,
    USER_IDX,
)
from recsys_spark.features import kernels

EVENTS = "events"
Kernel = Callable[[kernels.UserEvents], "pa.RecordBatch | pa.Table"]


def behavior_code(col_behavior: str = BEHAVIOR) -> Column:
    """Behaviour type as its dense code (``BEHAVIOR_CODES``; 0 stays free for padding)."""
    expr = F.lit(None).cast("tinyint")
    for name, code in BEHAVIOR_CODES.items():
        expr = F.when(F.col(col_behavior) == name, F.lit(code).cast("tinyint")).otherwise(expr)
    return expr


def collect_user_events(events: DataFrame) -> DataFrame:
    """One row per user: ``user_idx``, ``user_id``, ``events`` (unordered; kernels sort)."""
    entry = F.struct(
        F.unix_seconds(EVENT_TS).alias("ts"),
        F.col(ITEM_IDX).alias("item"),
        behavior_code().alias("behavior"),
        F.coalesce(F.col(CATEGORY_ID), F.lit(kernels.NO_CATEGORY)).alias("category"),
    )
    return events.groupBy(USER_IDX, USER_ID).agg(F.collect_list(entry).alias(EVENTS))


def _run(kernel: Kernel, collapse: bool, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        events = kernels.from_arrow(batch)
        if collapse:
            events = kernels.collapse_repeats(events)
        result = kernel(events)
        yield from result.to_batches() if isinstance(result, pa.Table) else [result]


def _map_users(collected: DataFrame, kernel: Kernel, schema: pa.Schema, *, collapse: bool) -> DataFrame:
    return collected.mapInArrow(partial(_run, kernel, collapse), from_arrow_schema(schema))


def build_user_features(
    collected: DataFrame, *, as_of: datetime, windows_days: Sequence[int], top_categories: int
) -> DataFrame:
    """``gold/user_features``: one row per user.

    Columns: user_idx, user_id, ``<behavior>_<w>d`` (events in the ``w`` days up to as_of) and
    ``<behavior>_total`` counts, total_events, last_event_ts, recency_seconds,
    distinct_categories, view_to_buy_rate (buys per page view, null without views),
    top_categories (most frequent category ids, ties to the smaller id).
    """
    kernel = partial(
        kernels.user_features,
        as_of=int(as_of.timestamp()),
        windows_days=list(windows_days),
        top_categories=top_categories,
    )
    return _map_users(collected, kernel, kernels.user_features_schema(windows_days), collapse=False)


def build_user_sequences(collected: DataFrame, *, max_length: int, collapse_repeats: bool) -> DataFrame:
    """``gold/user_sequences``: each user's most recent ``max_length`` events (model input).

    Columns: user_idx, user_id, items, behaviors (codes), gaps (seconds since the previous
    event, 0 first), last_event_ts, length. With ``collapse_repeats`` consecutive events on one
    item count once.
    """
    kernel = partial(kernels.user_sequences, max_length=max_length)
    return _map_users(collected, kernel, kernels.USER_SEQUENCES_SCHEMA, collapse=collapse_repeats)


def leave_one_out_examples(collected: DataFrame, *, max_length: int, collapse_repeats: bool) -> DataFrame:
    """Training/validation/test rows by the leave-one-out protocol (module docstring)."""
    kernel = partial(kernels.leave_one_out, max_length=max_length)
    return _map_users(collected, kernel, kernels.EXAMPLES_SCHEMA, collapse=collapse_repeats)


def temporal_examples(
    collected: DataFrame,
    *,
    validation_start: datetime,
    test_start: datetime,
    max_length: int,
    collapse_repeats: bool,
) -> DataFrame:
    """Training/validation/test rows by the temporal protocol (module docstring)."""
    kernel = partial(
        kernels.temporal,
        validation_start=int(validation_start.timestamp()),
        test_start=int(test_start.timestamp()),
        max_length=max_length,
    )
    return _map_users(collected, kernel, kernels.EXAMPLES_SCHEMA, collapse=collapse_repeats)
