"""The Delta -> torch streaming loader: exact coverage under sharding, shuffling, versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import WriterProperties, write_deltalake
from torch.utils.data import DataLoader

from recsys_spark.modeling.batches import eval_batch, sequence_batch
from recsys_spark.modeling.loader import (
    DeltaBatches,
    TableSlice,
    collate_with,
    count_rows,
    pad_left,
    prefetch,
)


def _rows(start: int, n: int, split: str = "train") -> pa.Table:
    ids = np.arange(start, start + n)
    return pa.table({
        "user_idx": pa.array(ids, pa.int32()),
        "history_items": pa.array([list(range(i % 7 + 1)) for i in ids], pa.list_(pa.int32())),
        "split": [split] * n,
    })


EXAMPLES = "gold/training_examples"


@pytest.fixture
def table(tmp_path: Path) -> str:
    """A lakehouse root holding gold/training_examples at version 5 (6 after ``append``)."""
    path = str(tmp_path / "gold" / "training_examples")
    for part in range(5):  # five files of 200 rows, 50-row row groups, plus validation rows
        write_deltalake(path, _rows(part * 200, 200), mode="append", partition_by=["split"],
                        writer_properties=WriterProperties(max_row_group_size=50))
    write_deltalake(path, _rows(10_000, 30, "validation"), mode="append", partition_by=["split"])
    return str(tmp_path)


def _users(batches: DeltaBatches) -> list[int]:
    return [u for b in batches for u in b.column("user_idx").to_pylist()]


def test_one_reader_sees_every_row_of_the_split_once(table: str) -> None:
    source = TableSlice(table, EXAMPLES, 5, "train")
    assert count_rows(source) == 1000
    users = _users(DeltaBatches(source, columns=["user_idx"], batch_size=64, shuffle=True, buffer_rows=128))
    assert sorted(users) == list(range(1000))


@pytest.mark.parametrize("world_size,workers", [(2, 1), (2, 2), (3, 1)])
def test_ranks_and_workers_partition_the_rows(table: str, world_size: int, workers: int) -> None:
    seen: list[int] = []
    for rank in range(world_size):
        dataset = DeltaBatches(TableSlice(table, EXAMPLES, 5, "train"), columns=["user_idx"], batch_size=32,
                               shuffle=True, buffer_rows=64, rank=rank, world_size=world_size)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        seen += [u for b in loader for u in b.column("user_idx").to_pylist()]
    assert sorted(seen) == list(range(1000))  # every row exactly once across all readers


def test_few_units_are_strided_so_every_rank_gets_rows(table: str) -> None:
    source = TableSlice(table, EXAMPLES, 5, "validation")  # one small file: fewer units than readers
    parts = [_users(DeltaBatches(source, columns=["user_idx"], batch_size=4, shuffle=False,
                                 buffer_rows=8, rank=r, world_size=3)) for r in range(3)]
    assert all(parts)
    assert sorted(u for part in parts for u in part) == list(range(10_000, 10_030))


def test_epochs_reshuffle_reproducibly(table: str) -> None:
    batches = DeltaBatches(TableSlice(table, EXAMPLES, 5, "train"), columns=["user_idx"], batch_size=50,
                           shuffle=True, seed=7, buffer_rows=200)
    batches.set_epoch(0)
    first = _users(batches)
    batches.set_epoch(1)
    second = _users(batches)
    batches.set_epoch(0)
    assert _users(batches) == first
    assert second != first and sorted(second) == sorted(first)


def test_reads_the_recorded_version_not_later_writes(table: str) -> None:
    write_deltalake(f"{table}/{EXAMPLES}", _rows(5000, 100), mode="append", partition_by=["split"])
    assert count_rows(TableSlice(table, EXAMPLES, 5, "train")) == 1000
    assert count_rows(TableSlice(table, EXAMPLES, 6, "train")) == 1100


def test_batches_respect_size_and_bucketing_groups_lengths(table: str) -> None:
    batches = DeltaBatches(TableSlice(table, EXAMPLES, 5, "train"), columns=["user_idx", "history_items"],
                           batch_size=100, shuffle=True, buffer_rows=1000, bucket_by="history_items")
    spreads = []
    for batch in batches:
        assert batch.num_rows <= 100
        lengths = [len(h) for h in batch.column("history_items").to_pylist()]
        spreads.append(max(lengths) - min(lengths))
    assert np.mean(spreads) <= 1  # unbucketed batches would span lengths 1..7


def test_bad_sizes_are_rejected(table: str) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        DeltaBatches(TableSlice(table, EXAMPLES, 5, "train"), columns=["user_idx"], batch_size=64, shuffle=False,
                     buffer_rows=10)


def test_pad_left_keeps_the_most_recent_items_right_aligned() -> None:
    lists = pa.array([[1, 2, 3, 4], [5], []], pa.list_(pa.int32()))
    assert pad_left(lists, 3, shift=1).tolist() == [[3, 4, 5], [0, 0, 6], [0, 0, 0]]


def test_sequence_and_eval_batches() -> None:
    batch = pa.RecordBatch.from_pydict({
        "user_idx": pa.array([0, 1], pa.int32()),
        "history_items": pa.array([[4, 5, 6], [7, 8]], pa.list_(pa.int32())),
        "history_behaviors": pa.array([[1, 1, 4], [1, 2]], pa.list_(pa.int8())),
        "history_gaps": pa.array([[0, 10, 20], [0, 5]], pa.list_(pa.int64())),
        "targets": pa.array([[9], [3]], pa.list_(pa.int32())),
        "seen_items": pa.array([[4, 5, 6], [7, 8]], pa.list_(pa.int32())),
    })
    train = sequence_batch(batch, max_length=4)
    # inputs are ids shifted by one; each position's target is the next item
    assert train.inputs.tolist() == [[5, 6], [0, 8]]
    assert train.targets.tolist() == [[6, 7], [0, 9]]
    evaluation = eval_batch(batch, max_length=4, mask_seen=True)
    assert evaluation.inputs.tolist() == [[5, 6, 7], [0, 8, 9]]
    assert evaluation.targets.tolist() == [[9], [3]]
    assert evaluation.seen.tolist() == [[4, 5, 6], [7, 8, -1]]
    assert eval_batch(batch, max_length=4, mask_seen=False).seen.tolist() == [[-1], [-1]]


def test_collate_with_cuts_batches_to_at_most_max_rows() -> None:
    # Spark hands evaluation 10,000 rows at a time; scoring them at once is 10,000 x catalogue.
    batches = [pa.RecordBatch.from_pydict({"x": list(range(n))}) for n in (7, 0, 3)]
    sizes = list(collate_with(batches, lambda b: b.num_rows, max_rows=3))
    assert sizes == [3, 3, 1, 3]
    assert list(collate_with(batches, lambda b: b.num_rows)) == [7, 3]


def test_prefetch_yields_everything_and_reraises_errors() -> None:
    assert list(prefetch(range(100), 3)) == list(range(100))

    def broken():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(prefetch(broken(), 2))
