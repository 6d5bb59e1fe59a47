"""Vectorised per-user derivations over Arrow batches: no Spark here, only NumPy and pyarrow.

Spark clusters each user's events together (a single shuffle); these kernels then turn a
batch of whole users' event rows into user features, sequences and training examples with array
arithmetic over all users of the batch at once — no per-user Python loop, no interpreted SQL
lambdas.

A batch is grouped into ``UserEvents``: per-user ``offsets`` into flat arrays sorted by
(user, time, item, behaviour). Shapes use U for users and N for events in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from recsys_spark.constants import (
    BEHAVIORS,
    BOUGHT_ITEMS,
    HISTORY_BEHAVIORS,
    HISTORY_END_TS,
    HISTORY_GAPS,
    HISTORY_ITEMS,
    LAST_EVENT_TS,
    LAST_STEP_TS,
    SEEN_ITEMS,
    SEQUENCE_BEHAVIORS,
    SEQUENCE_GAPS,
    SEQUENCE_ITEMS,
    SPLIT,
    TARGET_START_TS,
    TARGETS,
    TEST,
    TRAIN,
    USER_ID,
    USER_IDX,
    VALIDATION,
)

MICROS = 1_000_000
DAY_MICROS = 86_400 * MICROS
NO_CATEGORY = -1
MIN_EVENTS_FOR_LOO = 3

# Columns of the event rows the kernels read (see ``sequences.cluster_user_events``): each
# user's rows are contiguous, in no particular order of time.
EVENT_ROW_SCHEMA = pa.schema(
    [
        pa.field(USER_IDX, pa.int32()),
        pa.field(USER_ID, pa.int64()),
        pa.field("ts", pa.int64()),
        pa.field("item", pa.int32()),
        pa.field("behavior", pa.int8()),
        pa.field("category", pa.int64()),
    ]
)


@dataclass(frozen=True)
class UserEvents:
    """Events of U users, flat and sorted; user u owns ``[offsets[u], offsets[u+1])``."""

    user_idx: np.ndarray  # (U,) int32
    user_id: np.ndarray  # (U,) int64
    offsets: np.ndarray  # (U+1,) int64
    ts: np.ndarray  # (N,) int64 Unix microseconds (windows and cut-offs need sub-second times)
    item: np.ndarray  # (N,) int32
    behavior: np.ndarray  # (N,) int8, codes of BEHAVIOR_CODES
    category: np.ndarray  # (N,) int64, NO_CATEGORY when unknown
    # (U,) time of each user's last event before ``collapse_repeats`` (whose steps keep a run's
    # first time), 0 for users without events; None: the last of ``ts``.
    collapsed_from_last_ts: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_idx)

    @property
    def last_ts(self) -> np.ndarray:
        """(U,) time of each user's last event (0 when none), collapsed steps included."""
        if self.collapsed_from_last_ts is not None:
            return self.collapsed_from_last_ts
        ends = self.offsets[1:]
        return np.where(ends > self.offsets[:-1], self.ts[np.maximum(ends - 1, 0)] if len(self.ts) else 0, 0)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def owner(self) -> np.ndarray:
        """(N,) the batch position of each event's user."""
        return np.repeat(np.arange(self.n_users), self.lengths)


def whole_users(batches: Iterator[pa.RecordBatch], min_rows: int) -> Iterator[pa.Table]:
    """Regroup a stream of event rows (each user's rows contiguous) into tables that never
    split a user: once ``min_rows`` rows are read, all but the last user's go out.

    Spark hands a partition over in small batches that cut through users; the rows of the last
    user seen are carried into the next table, so memory stays at about ``min_rows`` plus the
    largest user's events.
    """
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        pending.append(batch)
        size += batch.num_rows
        if size < min_rows:
            continue
        rows = pa.Table.from_batches(pending).combine_chunks()
        users = rows.column(USER_IDX).to_numpy()
        # the last user may go on in the next batch: cut where its run starts
        others = np.flatnonzero(users != users[-1])
        if len(others) == 0:  # one user so far; keep reading
            continue
        cut = int(others[-1]) + 1
        yield rows.slice(0, cut)
        pending = rows.slice(cut).to_batches()
        size = len(users) - cut
    if size:
        yield pa.Table.from_batches(pending)


def from_arrow(rows: pa.Table | pa.RecordBatch) -> UserEvents:
    """Group and sort event rows of ``EVENT_ROW_SCHEMA`` whose users are each contiguous."""
    users = rows.column(USER_IDX).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(_changes(users))
    offsets = np.append(starts, len(users)).astype(np.int64)
    owner = np.repeat(np.arange(len(starts)), np.diff(offsets))
    columns = {
        name: rows.column(name).to_numpy(zero_copy_only=False) for name in ("ts", "item", "behavior", "category")
    }
    order = np.lexsort((columns["behavior"], columns["item"], columns["ts"], owner))
    return UserEvents(
        user_idx=users[starts].astype(np.int32),
        user_id=rows.column(USER_ID).to_numpy(zero_copy_only=False)[starts].astype(np.int64),
        offsets=offsets,
        ts=columns["ts"][order].astype(np.int64),
        item=columns["item"][order].astype(np.int32),
        behavior=columns["behavior"][order].astype(np.int8),
        category=columns["category"][order].astype(np.int64),
    )


def collapse_repeats(events: UserEvents) -> UserEvents:
    """One step per run of consecutive events on the same item (views, cart, buy of one item):
    at the run's first time, with its strongest behaviour (the highest code; buy is highest)."""
    keep = np.zeros(len(events.ts), dtype=bool)
    keep[events.offsets[:-1][events.lengths > 0]] = True
    keep[1:] |= events.item[1:] != events.item[:-1]
    runs = np.flatnonzero(keep)
    strongest = np.maximum.reduceat(events.behavior, runs) if len(runs) else None
    return replace(_subset(events, keep, behavior=strongest), collapsed_from_last_ts=events.last_ts)


def _subset(events: UserEvents, keep: np.ndarray, behavior: np.ndarray | None = None) -> UserEvents:
    """The events where ``keep`` holds, every user kept (possibly with none)."""
    kept_per_user = np.bincount(events.owner[keep], minlength=events.n_users)
    return UserEvents(
        user_idx=events.user_idx,
        user_id=events.user_id,
        offsets=np.concatenate([[0], np.cumsum(kept_per_user)]).astype(np.int64),
        ts=events.ts[keep],
        item=events.item[keep],
        behavior=events.behavior[keep] if behavior is None else behavior,
        category=events.category[keep],
    )


# --- user features -------------------------------------------------------------------------------


def user_feature_names(windows_days: Sequence[int]) -> list[str]:
    """Count columns in output order: ``<behavior>_<w>d`` per window, then ``<behavior>_total``."""
    names = []
    for behavior in BEHAVIORS:
        names += [f"{behavior}_{w}d" for w in windows_days] + [f"{behavior}_total"]
    return names


def user_features_schema(windows_days: Sequence[int]) -> pa.Schema:
    return pa.schema(
        [
            pa.field(USER_IDX, pa.int32()),
            pa.field(USER_ID, pa.int64()),
            *[pa.field(name, pa.int64()) for name in user_feature_names(windows_days)],
            pa.field("total_events", pa.int64()),
            pa.field(LAST_EVENT_TS, pa.timestamp("us", tz="UTC")),
            pa.field("recency_seconds", pa.int64()),
            pa.field("distinct_categories", pa.int64()),
            pa.field("view_to_buy_rate", pa.float64()),
            pa.field("top_categories", pa.list_(pa.int64())),
        ]
    )


def user_features(
    events: UserEvents, *, as_of: int, windows_days: Sequence[int], top_categories: int
) -> pa.RecordBatch:
    """Windowed counts per behaviour, recency, category breadth and tastes (see
    ``features.aggregates`` for the column meanings)."""
    n = events.n_users
    owner = events.owner
    age = as_of - events.ts
    columns: list[pa.Array] = []
    totals = {}
    for code, behavior in enumerate(BEHAVIORS, start=1):
        is_behavior = events.behavior == code
        for days in windows_days:
            hit = is_behavior & (age < days * DAY_MICROS)
            columns.append(pa.array(np.bincount(owner[hit], minlength=n)))
        totals[behavior] = np.bincount(owner[is_behavior], minlength=n)
        columns.append(pa.array(totals[behavior]))
    last = events.ts[events.offsets[1:] - 1]
    views = totals["pv"]
    rate = np.divide(totals["buy"], views, out=np.zeros(n), where=views > 0)
    distinct, top = _category_tastes(events, owner, top_categories)
    arrays = [
        pa.array(events.user_idx, pa.int32()),
        pa.array(events.user_id, pa.int64()),
        *columns,
        pa.array(events.lengths),
        _timestamps(last),
        pa.array((as_of - last) // MICROS),
        pa.array(distinct),
        pa.array(rate, mask=views == 0),
        top,
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=user_features_schema(windows_days))


def _category_tastes(events: UserEvents, owner: np.ndarray, k: int) -> tuple[np.ndarray, pa.Array]:
    """Distinct categories per user and the ``k`` most frequent (ties: smaller id first)."""
    known = events.category != NO_CATEGORY
    users, cats = owner[known], events.category[known]
    order = np.lexsort((cats, users))
    users, cats = users[order], cats[order]
    starts = np.flatnonzero(_changes(users, cats))
    counts = np.diff(np.r_[starts, len(users)])
    pair_user, pair_cat = users[starts], cats[starts]
    distinct = np.bincount(pair_user, minlength=events.n_users)
    ranked = np.lexsort((pair_cat, -counts, pair_user))
    pair_user, pair_cat = pair_user[ranked], pair_cat[ranked]
    group_start = np.searchsorted(pair_user, pair_user, side="left")
    rank = np.arange(len(pair_user)) - group_start
    chosen = rank < k
    lengths = np.bincount(pair_user[chosen], minlength=events.n_users)
    return distinct, _lists(lengths, pair_cat[chosen], pa.int64())


# --- sequences and examples ----------------------------------------------------------------------


USER_SEQUENCES_SCHEMA = pa.schema(
    [
        pa.field(USER_IDX, pa.int32()),
        pa.field(USER_ID, pa.int64()),
        pa.field(SEQUENCE_ITEMS, pa.list_(pa.int32())),
        pa.field(SEQUENCE_BEHAVIORS, pa.list_(pa.int8())),
        pa.field(SEQUENCE_GAPS, pa.list_(pa.int32())),
        pa.field(LAST_EVENT_TS, pa.timestamp("us", tz="UTC")),
        pa.field(LAST_STEP_TS, pa.timestamp("us", tz="UTC")),  # the gaps count back from it
        pa.field("length", pa.int32()),
        pa.field(BOUGHT_ITEMS, pa.list_(pa.int32())),
    ]
)

EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field(USER_IDX, pa.int32()),
        pa.field(USER_ID, pa.int64()),
        pa.field(HISTORY_ITEMS, pa.list_(pa.int32())),
        pa.field(HISTORY_BEHAVIORS, pa.list_(pa.int8())),
        pa.field(HISTORY_GAPS, pa.list_(pa.int32())),
        pa.field(HISTORY_END_TS, pa.timestamp("us", tz="UTC")),
        pa.field(TARGETS, pa.list_(pa.int32())),
        pa.field(TARGET_START_TS, pa.timestamp("us", tz="UTC")),
        pa.field(SEEN_ITEMS, pa.list_(pa.int32())),
        pa.field(SPLIT, pa.string()),
    ]
)


def user_sequences(events: UserEvents, *, max_length: int) -> pa.RecordBatch:
    """Each user's most recent ``max_length`` events: items, behaviour codes, gaps in seconds
    (0 for the first kept event), the time of the last step and of the user's last event (later
    when the last step is a collapsed run); and every item the user bought (not only in that
    window: a user's first nearline list must not offer them again)."""
    ends = events.offsets[1:]
    starts = np.maximum(events.offsets[:-1], ends - max_length)
    items, behaviors, gaps, end_ts = _windows(events, starts, ends)
    buys = _subset(events, events.behavior == BEHAVIORS.index("buy") + 1)
    bought_lengths, bought = _distinct(buys, buys.offsets[:-1], buys.offsets[1:])
    return pa.RecordBatch.from_arrays(
        [
            pa.array(events.user_idx, pa.int32()),
            pa.array(events.user_id, pa.int64()),
            items,
            behaviors,
            gaps,
            _timestamps(events.last_ts, mask=ends == starts),
            end_ts,
            pa.array((ends - starts).astype(np.int32)),
            _lists(bought_lengths, bought, pa.int32()),
        ],
        schema=USER_SEQUENCES_SCHEMA,
    )


def leave_one_out(events: UserEvents, *, max_length: int) -> pa.Table:
    """Leave-one-out rows (see ``features.sequences``): train, and for users with at least
    ``MIN_EVENTS_FOR_LOO`` events, validation (second-to-last) and test (last)."""
    begin, end = events.offsets[:-1], events.offsets[1:]
    evaluable = (end - begin) >= MIN_EVENTS_FOR_LOO
    users = np.arange(events.n_users)
    train_end = np.where(evaluable, end - 2, end)
    ev = users[evaluable]
    rows = [
        _Rows(users, begin, train_end, max_length + 1, None, TRAIN),
        _Rows(ev, begin[ev], end[ev] - 2, max_length, end[ev] - 2, VALIDATION),
        _Rows(ev, begin[ev], end[ev] - 1, max_length, end[ev] - 1, TEST),
    ]
    return _examples(events, rows, single_targets=True)


def temporal(
    events: UserEvents, *, validation_start: int, test_start: int, max_length: int, collapse: bool
) -> pa.Table:
    """Temporal rows (see ``features.sequences``): training sequences before
    ``validation_start``, validation/test targets = distinct items of each window.

    With ``collapse`` the histories are collapsed (``collapse_repeats``), the targets never: a
    window's first event on the item the history ends with is still a target.
    """
    begin, end = events.offsets[:-1], events.offsets[1:]
    # Sorted by time within each user, so each cut-off is one position per user.
    before_val, before_test = _cut(events, validation_start), _cut(events, test_start)
    users = np.arange(events.n_users)
    tr, va, te = users[before_val > begin], users[before_test > before_val], users[end > before_test]
    # Histories are collapsed per cut-off, so a step's strongest behaviour never comes from
    # inside the window it predicts.
    early, late = (
        collapse_repeats(_subset(events, events.ts < at)) if collapse else events
        for at in (validation_start, test_start)
    )
    early_end, late_end = _cut(early, validation_start), _cut(late, test_start)
    windows = (before_val[va], before_test[va]), (before_test[te], end[te])
    early_rows = [
        _Rows(tr, early.offsets[tr], early_end[tr], max_length + 1, None, TRAIN),
        _Rows(va, early.offsets[va], early_end[va], max_length, windows[0], VALIDATION),
    ]
    late_rows = [_Rows(te, late.offsets[te], late_end[te], max_length, windows[1], TEST)]
    return pa.concat_tables([
        _examples(early, early_rows, single_targets=False, target_events=events),
        _examples(late, late_rows, single_targets=False, target_events=events),
    ])


def _cut(events: UserEvents, at: int) -> np.ndarray:
    """Per user, the position of its first event at or after ``at``."""
    return events.offsets[:-1] + np.bincount(events.owner[events.ts < at], minlength=events.n_users)



@dataclass(frozen=True)
class _Rows:
    """Example rows of one split: history = events [begin, end) truncated to the last
    ``keep``; targets = the event at ``targets`` (int array) or the distinct items of the
    window ``targets = (start, stop)`` of the target events; None for training rows."""

    users: np.ndarray
    begin: np.ndarray
    end: np.ndarray
    keep: int
    targets: np.ndarray | tuple[np.ndarray, np.ndarray] | None
    split: str


def _examples(
    events: UserEvents, rows: list[_Rows], *, single_targets: bool,
    target_events: UserEvents | None = None,
) -> pa.Table:
    batches = []
    for r in rows:
        starts = np.maximum(r.begin, r.end - r.keep)
        items, behaviors, gaps, end_ts = _windows(events, starts, r.end)
        target_source = events if target_events is None else target_events
        targets, target_ts = _targets(target_source, r, single_targets)
        # Evaluation masks everything the user saw before the target, not only the truncated
        # history; training rows need no mask.
        seen_stop = r.end if r.targets is not None else r.begin
        seen_lengths, seen = _distinct(events, r.begin, seen_stop)
        batches.append(
            pa.RecordBatch.from_arrays(
                [
                    pa.array(events.user_idx[r.users], pa.int32()),
                    pa.array(events.user_id[r.users], pa.int64()),
                    items,
                    behaviors,
                    gaps,
                    end_ts,
                    targets,
                    target_ts,
                    _lists(seen_lengths, seen, pa.int32()),
                    pa.array(np.full(len(r.users), r.split, dtype=object), pa.string()),
                ],
                schema=EXAMPLES_SCHEMA,
            )
        )
    return pa.Table.from_batches(batches, schema=EXAMPLES_SCHEMA)


def _targets(events: UserEvents, rows: _Rows, single: bool) -> tuple[pa.Array, pa.Array]:
    n = len(rows.users)
    if rows.targets is None:
        no_targets = _lists(np.zeros(n, int), np.zeros(0, np.int32), pa.int32())
        return no_targets, pa.nulls(n, pa.timestamp("us", tz="UTC"))
    if single:
        at = np.asarray(rows.targets)
        return _lists(np.ones(n, int), events.item[at], pa.int32()), _timestamps(events.ts[at])
    start, stop = rows.targets
    lengths, items = _distinct(events, start, stop)
    return _lists(lengths, items, pa.int32()), _timestamps(events.ts[start])


def _distinct(events: UserEvents, start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct items of each range [start, stop), in order of first occurrence: (lengths,
    concatenated items)."""
    index = _ranges(start, stop)
    owner = np.repeat(np.arange(len(start)), stop - start)
    items = events.item[index]
    order = np.lexsort((np.arange(len(items)), items, owner))
    keep = np.sort(order[_changes(owner[order], items[order])])
    return np.bincount(owner[keep], minlength=len(start)), items[keep]


def _windows(
    events: UserEvents, starts: np.ndarray, ends: np.ndarray
) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """Items, behaviours, gaps and end time of the event ranges [starts, ends)."""
    lengths = ends - starts
    index = _ranges(starts, ends)
    ts = events.ts[index]
    gaps = np.zeros(len(index), dtype=np.int32)
    if len(index):
        gaps[1:] = np.diff(ts) // MICROS
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        gaps[first[lengths > 0]] = 0
    last = events.ts[np.maximum(ends - 1, 0)] if len(events.ts) else np.zeros(len(ends), np.int64)
    end_ts = np.where(lengths > 0, last, 0)
    return (
        _lists(lengths, events.item[index], pa.int32()),
        _lists(lengths, events.behavior[index], pa.int8()),
        _lists(lengths, gaps, pa.int32()),
        _timestamps(end_ts, mask=lengths == 0),
    )


def _changes(*keys: np.ndarray) -> np.ndarray:
    """True where a sorted run of equal key tuples starts."""
    if len(keys[0]) == 0:
        return np.zeros(0, dtype=bool)
    change = np.zeros(len(keys[0]), dtype=bool)
    change[0] = True
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    return change


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for each pair, without a Python loop."""
    lengths = np.asarray(ends - starts, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    shifts = np.repeat(np.asarray(starts, dtype=np.int64) - first, lengths)
    return np.arange(total, dtype=np.int64) + shifts


def _lists(lengths: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type))


def _timestamps(micros: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    return pa.array(np.asarray(micros, dtype=np.int64), pa.timestamp("us", tz="UTC"), mask=mask)
