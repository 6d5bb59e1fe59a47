"""Per-user tables — user features, sequences, training examples — from one shuffle.

``cluster_user_events`` brings each user's events together in one partition (the only
shuffle); ``derive_user_tables`` runs the vectorised kernels of ``features.kernels`` over them
with one ``mapInArrow`` for all three tables, so the per-user work is array arithmetic in the
Python workers, batched over many users, and every event crosses into Python once.

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
    GOLD_TRAINING_EXAMPLES,
    GOLD_USER_FEATURES,
    GOLD_USER_SEQUENCES,
    ITEM_IDX,
    USER_ID,
    USER_IDX,
)
from recsys_spark.features import kernels

# Event rows per kernel call: large enough that NumPy's per-call overhead vanishes, small
# enough to keep a Python worker's memory flat.
_ROWS_PER_KERNEL_CALL = 1 << 18
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Kernel = Callable[[kernels.UserEvents], "pa.RecordBatch | pa.Table"]


def behavior_code(col_behavior: str = BEHAVIOR) -> Column:
    """Behaviour type as its dense code (``BEHAVIOR_CODES``; 0 stays free for padding)."""
    expr = F.lit(None).cast("tinyint")
    for name, code in BEHAVIOR_CODES.items():
        expr = F.when(F.col(col_behavior) == name, F.lit(code).cast("tinyint")).otherwise(expr)
    return expr


def cluster_user_events(events: DataFrame) -> DataFrame:
    """Event rows of ``kernels.EVENT_ROW_SCHEMA``, each user's rows contiguous in one partition.

    A hash shuffle plus a sort on the user index only: grouping into one list per user
    (``collect_list``) cost twice as much, since Spark's sort-based fallback aggregation copies
    every event again. The kernels order each user's events themselves.
    """
    rows = events.select(
        F.col(USER_IDX).cast("int").alias(USER_IDX),
        F.col(USER_ID).cast("long").alias(USER_ID),
        F.unix_micros(EVENT_TS).alias("ts"),
        F.col(ITEM_IDX).cast("int").alias("item"),
        behavior_code().alias("behavior"),
        F.coalesce(F.col(CATEGORY_ID), F.lit(kernels.NO_CATEGORY)).cast("long").alias("category"),
    )
    return rows.repartition(USER_IDX).sortWithinPartitions(USER_IDX)


@dataclass(frozen=True)
class UserTable:
    """A per-user table: its name, Arrow schema, the kernel that derives its rows from a batch
    of users, and whether consecutive repeats are collapsed before the kernel sees them."""

    name: str
    schema: pa.Schema
    kernel: Kernel
    collapse: bool

    @property
    def column(self) -> str:
        """The struct column that carries this table's rows in ``derive_user_tables``."""
        return self.name.rsplit("/", 1)[-1]


def user_features_table(*, as_of: datetime, windows_days: Sequence[int], top_categories: int) -> UserTable:
    """``gold/user_features``: one row per user.

    Columns: user_idx, user_id, ``<behavior>_<w>d`` (events in the ``w`` days up to as_of) and
    ``<behavior>_total`` counts, total_events, last_event_ts, recency_seconds,
    distinct_categories, view_to_buy_rate (buys per page view, null without views),
    top_categories (most frequent category ids, ties to the smaller id).
    """
    kernel = partial(
        kernels.user_features,
        as_of=_micros(as_of),
        windows_days=list(windows_days),
        top_categories=top_categories,
    )
    return UserTable(GOLD_USER_FEATURES, kernels.user_features_schema(windows_days), kernel, collapse=False)


def user_sequences_table(*, max_length: int, collapse_repeats: bool) -> UserTable:
    """``gold/user_sequences``: each user's most recent ``max_length`` events (model input).

    Columns: user_idx, user_id, items, behaviors (codes), gaps (seconds since the previous
    event, 0 first), last_event_ts (the user's last event), last_step_ts (the last step's time,
    which the gaps count back from), length, bought_items. With ``collapse_repeats`` consecutive
    events on one item count once, at the first one's time.
    """
    kernel = partial(kernels.user_sequences, max_length=max_length)
    return UserTable(GOLD_USER_SEQUENCES, kernels.USER_SEQUENCES_SCHEMA, kernel, collapse=collapse_repeats)


def leave_one_out_table(*, max_length: int, collapse_repeats: bool) -> UserTable:
    """``gold/training_examples`` by the leave-one-out protocol (module docstring)."""
    kernel = partial(kernels.leave_one_out, max_length=max_length)
    return UserTable(GOLD_TRAINING_EXAMPLES, kernels.EXAMPLES_SCHEMA, kernel, collapse=collapse_repeats)


def temporal_table(
    *, validation_start: datetime, test_start: datetime, max_length: int, collapse_repeats: bool
) -> UserTable:
    """``gold/training_examples`` by the temporal protocol (module docstring)."""
    kernel = partial(
        kernels.temporal,
        validation_start=_micros(validation_start),
        test_start=_micros(test_start),
        max_length=max_length,
        collapse=collapse_repeats,  # histories only: targets keep every window event
    )
    return UserTable(GOLD_TRAINING_EXAMPLES, kernels.EXAMPLES_SCHEMA, kernel, collapse=False)


def _micros(moment: datetime) -> int:
    """Unix microseconds, exactly (``timestamp()`` is a float)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def derive_user_tables(clustered: DataFrame, tables: Sequence[UserTable]) -> DataFrame:
    """The rows of every table in ``tables`` from one pass over ``cluster_user_events`` rows.

    Each output row belongs to one table and carries it in that table's struct column
    (``UserTable.column``; the others are null): one Python pass sorts each batch of users
    once for all tables, where a pass per table would re-read every event. ``user_table``
    takes one table back out.
    """
    schema = _derived_schema(tables)
    return clustered.mapInArrow(partial(_derive, tuple(tables), schema), from_arrow_schema(schema))


def user_table(derived: DataFrame, table: UserTable) -> DataFrame:
    """The rows of ``table`` in the output of ``derive_user_tables``."""
    return derived.filter(F.col(table.column).isNotNull()).select(f"{table.column}.*")


def _derived_schema(tables: Sequence[UserTable]) -> pa.Schema:
    return pa.schema([pa.field(t.column, pa.struct(list(t.schema))) for t in tables])


def _derive(
    tables: tuple[UserTable, ...], schema: pa.Schema, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    for chunk in kernels.whole_users(batches, min_rows=_ROWS_PER_KERNEL_CALL):
        events = kernels.from_arrow(chunk)
        collapsed: kernels.UserEvents | None = None
        for position, table in enumerate(tables):
            if table.collapse and collapsed is None:
                collapsed = kernels.collapse_repeats(events)
            result = table.kernel(collapsed if table.collapse and collapsed is not None else events)
            for rows in result.to_batches() if isinstance(result, pa.Table) else [result]:
                columns = [
                    pa.StructArray.from_arrays(rows.columns, fields=list(rows.schema))
                    if i == position
                    else pa.nulls(rows.num_rows, field.type)
                    for i, field in enumerate(schema)
                ]
                yield pa.RecordBatch.from_arrays(columns, schema=schema)
