"""Metrics against examples computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import WriterProperties, write_deltalake

from recsys_spark.evaluation.evaluate import evaluate_scorer
from recsys_spark.evaluation.metrics import batch_sums, empty_sums, target_ranks
from recsys_spark.modeling.loader import TableSlice


def test_single_target_by_hand() -> None:
    # 6 items; row 0's target (item 2) ranks 2nd, row 1's target (item 5) ranks 5th.
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.2, 0.0], [0.6, 0.5, 0.4, 0.3, 0.2, 0.25]])
    targets = torch.tensor([[2], [5]])
    m = batch_sums(scores, targets, ks=(1, 2, 5)).sums
    assert m["hit@1"] == 0 and m["hit@2"] == 1 and m["hit@5"] == 2
    assert m["ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(3) + 1 / math.log2(6))
    assert m["mrr"] == pytest.approx(1 / 2 + 1 / 5)
    assert m["recall@5"] == m["hit@5"]


def test_seen_items_are_masked() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7]])
    # without masking item 3 ranks 3rd; masking items 0 and 1 moves it to 1st
    assert batch_sums(scores, torch.tensor([[3]]), ks=(1,)).sums["hit@1"] == 0
    masked = batch_sums(scores, torch.tensor([[3]]), torch.tensor([[0, 1]]), ks=(1,))
    assert masked.sums["hit@1"] == 1 and masked.sums["mrr"] == 1
    # a target that is itself seen can never be hit
    assert batch_sums(scores, torch.tensor([[0]]), torch.tensor([[0, -1]]), ks=(4,)).sums["hit@4"] == 0


def test_masked_target_is_no_hit_even_when_k_exceeds_the_catalogue() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7]])
    m = batch_sums(scores, torch.tensor([[0]]), torch.tensor([[0]]), ks=(4, 5, 10)).sums
    assert m["hit@5"] == m["hit@10"] == m["ndcg@10"] == m["mrr"] == 0


def test_nan_scores_are_the_worst_not_a_perfect_hit() -> None:
    # A diverged model (NaN everywhere) must score 0, or it would win every champion gate.
    m = batch_sums(torch.full((2, 5), float("nan")), torch.tensor([[1], [3]]), ks=(1, 10)).sums
    assert all(math.isfinite(v) for v in m.values())
    assert m["hit@1"] == m["hit@10"] == m["ndcg@10"] == m["mrr"] == 0


def test_multiple_targets_recall_ndcg_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    targets = torch.tensor([[1, 4, -1]])  # ranks 1 and 4 (0-based)
    m = batch_sums(scores, targets, ks=(2, 5)).sums
    assert m["hit@2"] == 1 and m["recall@2"] == pytest.approx(0.5) and m["recall@5"] == 1
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    ideal = 1 + 1 / math.log2(3)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / ideal)
    assert m["mrr"] == pytest.approx(1 / 2)


def test_ties_count_against_the_model() -> None:
    constant = torch.zeros(1, 100)
    assert target_ranks(constant, torch.tensor([[7]])).item() == 99
    assert batch_sums(constant, torch.tensor([[7]]), ks=(10,)).sums["hit@10"] == 0


def test_coverage_and_means_over_shards() -> None:
    a = batch_sums(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[0]]), ks=(2,))
    b = batch_sums(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([[0]]), ks=(2,))
    total = empty_sums(4, (2,))
    total.add(a)
    total.add(b)
    means = total.means()
    assert means["hit@2"] == 0.5 and means["coverage@2"] == 1.0
    # the all-reduce encoding round-trips (summed vectors -> same means)
    again = empty_sums(4, (2,))
    again.from_vector(a.as_vector() + b.as_vector())
    assert again.means() == means


def test_rows_without_targets_are_skipped_and_empty_is_an_error() -> None:
    sums = batch_sums(torch.rand(3, 5), torch.tensor([[-1], [2], [-1]]), ks=(5,))
    assert sums.rows == 1
    with pytest.raises(ValueError, match="no rows"):
        empty_sums(5, (10,)).means()


def test_random_scores_match_a_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 50))
    targets = rng.integers(0, 50, size=(20, 1))
    m = batch_sums(torch.tensor(scores), torch.tensor(targets), ks=(10,)).sums
    ranks = [(scores[i] >= scores[i, targets[i, 0]]).sum() - 1 for i in range(20)]
    assert m["hit@10"] == sum(r < 10 for r in ranks)
    assert m["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks if r < 10))


def test_streamed_sharded_evaluation_equals_one_batch(tmp_path) -> None:
    """``evaluate_scorer`` streams a Delta split in small batches, sharded over ranks; the sums
    must equal one batch over every row."""
    rng = np.random.default_rng(3)
    n, items = 700, 40
    lengths = rng.integers(1, 12, n)
    histories = [rng.integers(0, items, k).tolist() for k in lengths]
    targets = [[int(t)] for t in rng.integers(0, items, n)]
    table = pa.table({
        "user_idx": pa.array(np.arange(n), pa.int32()),
        "history_items": pa.array(histories, pa.list_(pa.int32())),
        "history_behaviors": pa.array([[1] * k for k in lengths], pa.list_(pa.int8())),
        "history_gaps": pa.array([[0] * k for k in lengths], pa.list_(pa.int64())),
        "targets": pa.array(targets, pa.list_(pa.int32())),
        "seen_items": pa.array(histories, pa.list_(pa.int32())),
        "split": ["validation"] * n,
    })
    path = str(tmp_path / "gold" / "training_examples")
    write_deltalake(path, table, partition_by=["split"], writer_properties=WriterProperties(max_row_group_size=100))
    user_scores = torch.randn(n, items, generator=torch.Generator().manual_seed(0))

    def score(batch):  # depends on the row only, not on its batch
        return user_scores[batch.users]

    total = empty_sums(items, (5, 10, 20))
    for rank in range(2):
        source = TableSlice(str(tmp_path), "gold/training_examples", 0, "validation")
        total.add(evaluate_scorer(score, source, num_items=items, max_length=50,
                                  ks=(5, 10, 20), mask_seen=True, batch_size=16, rank=rank, world_size=2))
    seen = torch.full((n, int(lengths.max())), -1)
    for row, history in enumerate(histories):
        seen[row, : len(history)] = torch.tensor(history)
    expected = batch_sums(user_scores, torch.tensor(targets), seen, ks=(5, 10, 20))
    assert total.rows == n
    assert total.sums == pytest.approx(expected.sums)
    for k in (5, 10, 20):
        assert (total.recommended[k] == expected.recommended[k]).all()
