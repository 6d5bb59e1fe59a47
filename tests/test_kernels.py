"""The vectorised per-user kernels against a plain per-user Python reference, no Spark."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pytest

from recsys_spark.features import kernels

US = 1_000_000  # kernel times are Unix microseconds
AS_OF = 1_700_000_000 * US
DAY = 86_400 * US
HOUR = 3_600 * US
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def random_batch(seed: int, users: int = 40) -> pa.RecordBatch:
    """Event rows as Spark hands them over: each user's rows together, in random time order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in rng.permutation(users):
        for _ in range(int(rng.integers(1, 12))):
            rows.append(
                {
                    "user_idx": int(u),
                    "user_id": 1000 + int(u),
                    # whole hours, so ties happen, some with a sub-second part
                    "ts": int(AS_OF - rng.integers(0, 40 * DAY)) // HOUR * HOUR
                    + int(rng.choice([0, 0, 250_000])),
                    "item": int(rng.integers(0, 6)),
                    "behavior": int(rng.integers(1, 5)),
                    "category": int(rng.choice([-1, 7, 8, 9])),
                }
            )
    return pa.RecordBatch.from_pylist(rows, schema=kernels.EVENT_ROW_SCHEMA)


def reference_histories(batch: pa.RecordBatch, collapse: bool) -> dict[int, list[dict]]:
    """Each user's events in time order, users in the order they come."""
    out: dict[int, list[dict]] = {}
    for row in batch.to_pylist():
        out.setdefault(row["user_idx"], []).append(row)
    for u, events in out.items():
        events.sort(key=lambda e: (e["ts"], e["item"], e["behavior"]))
        if collapse:  # a run on one item is one step, at its first time, with its strongest behaviour
            runs: list[dict] = []
            for e in events:
                if runs and runs[-1]["item"] == e["item"]:
                    runs[-1]["behavior"] = max(runs[-1]["behavior"], e["behavior"])
                else:
                    runs.append(dict(e))
            out[u] = runs
    return out


def gaps(events: list[dict]) -> list[int]:
    return [0] + [(b["ts"] - a["ts"]) // US for a, b in pairwise(events)]


@pytest.mark.parametrize("seed", range(5))
def test_user_features_match_reference(seed: int) -> None:
    batch = random_batch(seed)
    got = kernels.user_features(kernels.from_arrow(batch), as_of=AS_OF, windows_days=[1, 7, 30],
                                top_categories=2).to_pylist()
    for row, events in zip(got, reference_histories(batch, collapse=False).values(), strict=True):
        for code, name in enumerate(("pv", "cart", "fav", "buy"), start=1):
            mine = [e for e in events if e["behavior"] == code]
            assert row[f"{name}_total"] == len(mine)
            for w in (1, 7, 30):
                assert row[f"{name}_{w}d"] == sum(AS_OF - e["ts"] < w * DAY for e in mine)
        assert row["total_events"] == len(events)
        assert row["recency_seconds"] == (AS_OF - events[-1]["ts"]) // US
        cats = Counter(e["category"] for e in events if e["category"] != -1)
        assert row["distinct_categories"] == len(cats)
        assert row["top_categories"] == [c for c, _ in sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))][:2]
        views = sum(e["behavior"] == 1 for e in events)
        buys = sum(e["behavior"] == 4 for e in events)
        assert row["view_to_buy_rate"] == (None if views == 0 else pytest.approx(buys / views))


@pytest.mark.parametrize(("seed", "collapse"), [(s, c) for s in range(4) for c in (False, True)])
def test_sequences_match_reference(seed: int, collapse: bool) -> None:
    batch = random_batch(seed)
    events = kernels.from_arrow(batch)
    if collapse:
        events = kernels.collapse_repeats(events)
    got = kernels.user_sequences(events, max_length=4).to_pylist()
    every = reference_histories(batch, collapse=False).values()
    for row, history, raw in zip(got, reference_histories(batch, collapse).values(), every, strict=True):
        recent = history[-4:]
        assert row["bought_items"] == list(dict.fromkeys(e["item"] for e in history if e["behavior"] == 4))
        assert row["items"] == [e["item"] for e in recent]
        assert row["behaviors"] == [e["behavior"] for e in recent]
        assert row["gaps"] == gaps(recent)
        assert row["length"] == len(recent)
        assert (row["last_step_ts"] - EPOCH) // timedelta(microseconds=1) == recent[-1]["ts"]
        # the user's last event, even when the last step is a run collapsed to its first time
        assert (row["last_event_ts"] - EPOCH) // timedelta(microseconds=1) == raw[-1]["ts"]


@pytest.mark.parametrize("seed", range(4))
def test_leave_one_out_matches_reference(seed: int) -> None:
    batch = random_batch(seed)
    got = kernels.leave_one_out(kernels.collapse_repeats(kernels.from_arrow(batch)), max_length=3).to_pylist()
    expected = []
    for u, h in reference_histories(batch, collapse=True).items():
        items = [e["item"] for e in h]
        if len(h) >= 3:
            expected += [
                (u, "train", items[:-2][-4:], [], []),
                (u, "validation", items[:-2][-3:], [items[-2]], list(dict.fromkeys(items[:-2]))),
                (u, "test", items[:-1][-3:], [items[-1]], list(dict.fromkeys(items[:-1]))),
            ]
        else:
            expected.append((u, "train", items[-4:], [], []))
    rows = [(r["user_idx"], r["split"], r["history_items"], r["targets"], r["seen_items"]) for r in got]
    assert sorted(rows) == sorted(expected)
    for r in got:
        if r["targets"]:
            assert r["history_end_ts"] <= r["target_start_ts"]


@pytest.mark.parametrize(("seed", "collapse"), [(s, c) for s in range(4) for c in (False, True)])
def test_temporal_matches_reference(seed: int, collapse: bool) -> None:
    # Collapsing shortens histories only: a window's targets are all its distinct items, even
    # one the user last touched just before the window.
    batch = random_batch(seed)
    val, test = AS_OF - 20 * DAY, AS_OF - 8 * DAY
    got = kernels.temporal(kernels.from_arrow(batch), validation_start=val, test_start=test,
                           max_length=3, collapse=collapse).to_pylist()
    expected = []
    histories = reference_histories(batch, collapse=collapse)
    for u, h in reference_histories(batch, collapse=False).items():
        before_val = [e["item"] for e in histories[u] if e["ts"] < val]
        before_test = [e["item"] for e in histories[u] if e["ts"] < test]
        in_val = list(dict.fromkeys(e["item"] for e in h if val <= e["ts"] < test))
        in_test = list(dict.fromkeys(e["item"] for e in h if e["ts"] >= test))
        if before_val:
            expected.append((u, "train", before_val[-4:], [], []))
        if in_val:
            expected.append((u, "validation", before_val[-3:], in_val, list(dict.fromkeys(before_val))))
        if in_test:
            expected.append((u, "test", before_test[-3:], in_test, list(dict.fromkeys(before_test))))
    rows = [(r["user_idx"], r["split"], r["history_items"], r["targets"], r["seen_items"]) for r in got]
    assert sorted(rows) == sorted(expected)


def test_empty_batch_gives_empty_tables() -> None:
    batch = random_batch(0, users=0)
    events = kernels.from_arrow(batch)
    assert kernels.user_sequences(events, max_length=5).num_rows == 0
    assert kernels.leave_one_out(events, max_length=5).num_rows == 0
    assert kernels.user_features(events, as_of=AS_OF, windows_days=[1], top_categories=1).num_rows == 0


@pytest.mark.parametrize(("seed", "min_rows"), [(0, 1), (1, 5), (2, 17), (3, 1000)])
def test_whole_users_regroup_batches_without_splitting_a_user(seed: int, min_rows: int) -> None:
    rows = pa.Table.from_batches([random_batch(seed)])
    rng = np.random.default_rng(seed)
    cuts = np.unique(np.concatenate([[0], rng.integers(0, rows.num_rows, 30), [rows.num_rows]]))
    batches = [rows.slice(a, b - a).combine_chunks().to_batches()[0] for a, b in pairwise(cuts)]
    chunks = list(kernels.whole_users(iter(batches), min_rows=min_rows))
    assert pa.concat_tables(chunks).equals(rows)  # nothing lost, nothing reordered
    owners = [set(c.column("user_idx").to_pylist()) for c in chunks]
    assert sum(map(len, owners)) == len(set().union(*owners))  # no user in two chunks
    assert all(c.num_rows > 0 for c in chunks)


def test_whole_users_keep_a_user_longer_than_a_chunk_together() -> None:
    one = pa.RecordBatch.from_pylist(
        [{"user_idx": 7, "user_id": 70, "ts": t, "item": 1, "behavior": 1, "category": -1} for t in range(10)]
        + [{"user_idx": 8, "user_id": 80, "ts": 0, "item": 2, "behavior": 1, "category": -1}],
        schema=kernels.EVENT_ROW_SCHEMA,
    )
    batches = [one.slice(i, 2) for i in range(0, 11, 2)]
    chunks = list(kernels.whole_users(iter(batches), min_rows=3))
    assert [c.column("user_idx").to_pylist() for c in chunks] == [[7] * 10, [8]]


def test_collapsed_step_keeps_the_strongest_behaviour() -> None:
    rows = [{"user_idx": 0, "user_id": 5, "ts": AS_OF + i * US, "item": item, "behavior": code, "category": 7}
            for i, (item, code) in enumerate([(10, 1), (10, 2), (10, 4), (10, 1), (11, 1)])]
    batch = pa.RecordBatch.from_pylist(rows, schema=kernels.EVENT_ROW_SCHEMA)
    events = kernels.collapse_repeats(kernels.from_arrow(batch))
    (row,) = kernels.user_sequences(events, max_length=5).to_pylist()
    assert (row["items"], row["behaviors"], row["gaps"]) == ([10, 11], [4, 1], [0, 4])


def test_windows_are_exact_to_the_microsecond() -> None:
    # Ages just under a day count in the 1-day window, exactly a day does not: whole seconds
    # would round 86,399.95 s onto the edge.
    ages = [0, DAY - 50_000, DAY, 7 * DAY - 90_000]
    rows = [{"user_idx": 0, "user_id": 5, "ts": AS_OF + 900_000 - age, "item": i, "behavior": 1, "category": 7}
            for i, age in enumerate(ages)]
    events = kernels.from_arrow(pa.RecordBatch.from_pylist(rows, schema=kernels.EVENT_ROW_SCHEMA))
    (row,) = kernels.user_features(events, as_of=AS_OF + 900_000, windows_days=[1, 7], top_categories=1).to_pylist()
    assert (row["pv_1d"], row["pv_7d"]) == (2, 4)
