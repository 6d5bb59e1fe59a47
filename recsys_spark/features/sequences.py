"""Per-user event sequences and the training examples cut from them.

A *history* is one row per user with ``events``: an array of ``(ts, item, behavior)`` structs
in time order (ties broken by item, then behaviour code, so it is deterministic). Sequences and
examples are array operations on histories — one shuffle to build them, none after.

Split protocols (``gold/training_examples``, partitioned by ``split``):

* ``leave-one-out`` — per user with at least 3 events: the last item is the test target, the
  second-to-last the validation target, the rest the training sequence. Validation histories end
  before their target; test histories include the validation item (as the published protocol).
  Users with fewer events contribute a training row only.
* ``temporal`` — two cut-off times. Training sequences hold events before ``validation_start``;
  validation targets are the distinct items of ``[validation_start, test_start)`` and test targets
  those of ``[test_start, as_of]``, each with the history before its window.

Every example has ``history_end_ts <= target_start_ts``, which the leakage test checks.
"""

from __future__ import annotations

from datetime import datetime

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from recsys_spark.constants import (
    BEHAVIOR,
    BEHAVIOR_CODES,
    EVENT_TS,
    ITEM_IDX,
    SPLIT,
    TEST,
    TRAIN,
    USER_ID,
    USER_IDX,
    VALIDATION,
)

EVENTS = "events"
MIN_EVENTS_FOR_LOO = 3



def behavior_code(col_behavior: str = BEHAVIOR) -> Column:
    """Behaviour type as its dense code (``BEHAVIOR_CODES``; 0 stays free for padding)."""
    expr = F.lit(None).cast("tinyint")
    for name, code in BEHAVIOR_CODES.items():
        expr = F.when(F.col(col_behavior) == name, F.lit(code).cast("tinyint")).otherwise(expr)
    return expr


def build_histories(events: DataFrame, *, collapse_repeats: bool) -> DataFrame:
    """One row per user: ``user_idx``, ``user_id``, ``events`` sorted by time.

    With ``collapse_repeats`` consecutive events on the same item keep only the first, so a run
    of page views of one item counts once (the target of a next-item task must be a new item).
    """
    entry = F.struct(
        F.col(EVENT_TS).alias("ts"),
        F.col(ITEM_IDX).alias("item"),
        behavior_code().alias("behavior"),
    )
    histories = events.groupBy(USER_IDX, USER_ID).agg(F.sort_array(F.collect_list(entry)).alias(EVENTS))
    if collapse_repeats:
        histories = histories.withColumn(
            EVENTS,
            F.filter(
                EVENTS,
                lambda x, i: (i == 0) | (x["item"] != F.try_element_at(F.col(EVENTS), i)["item"]),
            ),
        )
    return histories


def last_n(array: Column, n: int) -> Column:
    """The last ``n`` elements of ``array`` (all of it when shorter)."""
    return F.slice(array, F.greatest(F.size(array) - n + 1, F.lit(1)), n)


def _flatten(history: str, prefix: str) -> list[Column]:
    """Items, behaviour codes, gaps (seconds since the previous event, 0 first) and end time of
    the events array in column ``history``.

    ``history`` must be a column, not an expression: lambdas below index into it per element,
    and an expression would be re-evaluated for every element.
    """
    h = F.col(history)
    gaps = F.transform(
        h,
        lambda x, i: F.when(i == 0, F.lit(0))
        .otherwise(F.unix_seconds(x["ts"]) - F.unix_seconds(F.try_element_at(h, i)["ts"]))
        .cast("int"),
    )
    return [
        F.transform(h, lambda x: x["item"]).alias(f"{prefix}_items"),
        F.transform(h, lambda x: x["behavior"]).alias(f"{prefix}_behaviors"),
        gaps.alias(f"{prefix}_gaps"),
        F.try_element_at(h, F.lit(-1))["ts"].alias(f"{prefix}_end_ts"),
    ]


def build_user_sequences(histories: DataFrame, *, max_length: int) -> DataFrame:
    """``gold/user_sequences``: each user's most recent ``max_length`` events (model input).

    Columns: user_idx, user_id, items, behaviors, gaps, last_event_ts, length.
    """
    recent = histories.select(USER_IDX, USER_ID, last_n(F.col(EVENTS), max_length).alias("_recent"))
    items, behaviors, gaps, end = _flatten("_recent", "seq")
    return recent.select(
        USER_IDX,
        USER_ID,
        items.alias("items"),
        behaviors.alias("behaviors"),
        gaps.alias("gaps"),
        end.alias("last_event_ts"),
        F.size("_recent").alias("length"),
    )


def _example(history: Column, targets: Column, target_start: Column, split: str) -> Column:
    return F.struct(
        history.alias("_history"),
        targets.cast("array<int>").alias("targets"),
        target_start.cast("timestamp").alias("target_start_ts"),
        F.lit(split).alias(SPLIT),
    )


def _explode_examples(histories: DataFrame, examples: list[Column]) -> DataFrame:
    rows = (
        histories.select(USER_IDX, USER_ID, F.explode(F.array(*examples)).alias("_x"))
        .filter(F.col("_x").isNotNull())
        .select(USER_IDX, USER_ID, "_x.*")
    )
    return rows.select(
        USER_IDX, USER_ID, *_flatten("_history", "history"), "targets", "target_start_ts", SPLIT
    )


def leave_one_out_examples(histories: DataFrame, *, max_length: int) -> DataFrame:
    """Training/validation/test rows by the leave-one-out protocol (see module docstring).

    Training rows keep ``max_length + 1`` events: the model predicts positions 2..L+1 from
    positions 1..L of the same sequence.
    """
    h = F.col(EVENTS)
    n = F.size(h)
    no_targets = F.array()
    evaluable = n >= MIN_EVENTS_FOR_LOO
    train_events = F.when(evaluable, F.slice(h, 1, n - 2)).otherwise(h)
    val_target = F.try_element_at(h, F.lit(-2))
    test_target = F.try_element_at(h, F.lit(-1))
    examples = [
        _example(last_n(train_events, max_length + 1), no_targets, F.lit(None), TRAIN),
        F.when(
            evaluable,
            _example(
                last_n(F.slice(h, 1, n - 2), max_length),
                F.array(val_target["item"]),
                val_target["ts"],
                VALIDATION,
            ),
        ),
        F.when(
            evaluable,
            _example(
                last_n(F.slice(h, 1, n - 1), max_length),
                F.array(test_target["item"]),
                test_target["ts"],
                TEST,
            ),
        ),
    ]
    return _explode_examples(histories, examples)


def temporal_examples(
    histories: DataFrame,
    *,
    validation_start: datetime,
    test_start: datetime,
    max_length: int,
) -> DataFrame:
    """Training/validation/test rows by the temporal protocol (see module docstring)."""
    h = F.col(EVENTS)
    val_start = F.lit(validation_start).cast("timestamp")
    tst_start = F.lit(test_start).cast("timestamp")
    before_val = F.filter(h, lambda x: x["ts"] < val_start)
    before_test = F.filter(h, lambda x: x["ts"] < tst_start)
    in_val = F.filter(h, lambda x: (x["ts"] >= val_start) & (x["ts"] < tst_start))
    in_test = F.filter(h, lambda x: x["ts"] >= tst_start)

    def window_example(history: Column, window: Column, split: str) -> Column:
        targets = F.array_distinct(F.transform(window, lambda x: x["item"]))
        return F.when(
            F.size(window) > 0,
            _example(last_n(history, max_length), targets, F.try_element_at(window, F.lit(1))["ts"], split),
        )

    examples = [
        F.when(
            F.size(before_val) > 0,
            _example(
                last_n(before_val, max_length + 1),
                F.array(),
                F.lit(None),
                TRAIN,
            ),
        ),
        window_example(before_val, in_val, VALIDATION),
        window_example(before_test, in_test, TEST),
    ]
    return _explode_examples(histories, examples)
