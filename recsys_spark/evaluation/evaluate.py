"""Full-ranking evaluation of any scorer over a split of ``gold/training_examples``.

Three ways to run the same metric code (``metrics.batch_sums``):

* ``evaluate_scorer`` — stream the split through one process (a DDP rank evaluates its shard
  with it, then the ranks all-reduce the sums);
* ``evaluate_registered`` — the same for a model loaded from the MLflow registry (gating);
* ``evaluate_in_spark`` — Spark partitions of users each load the registered model once per
  Python worker and return metric sums; the driver adds them up (``versions.evaluate_version``,
  behind ``recsys evaluate``, picks the version and the rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from recsys_spark.evaluation.metrics import MetricSums, batch_sums, empty_sums
from recsys_spark.modeling.batches import EVAL_COLUMNS, EvalBatch, eval_batch
from recsys_spark.modeling.loader import DeltaBatches, TableSlice, collate_with, prefetch

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from recsys_spark.modeling.package import RecommenderModel

Scorer = Callable[[EvalBatch], torch.Tensor]


def widen(scores: torch.Tensor, num_items: int) -> torch.Tensor:
    """Scores of a model trained on a smaller catalogue, padded with -inf for items it has
    never seen (dictionaries only grow, so old indices keep their meaning)."""
    if scores.shape[1] >= num_items:
        return scores[:, :num_items]
    pad = torch.full((scores.shape[0], num_items - scores.shape[1]), float("-inf"), dtype=scores.dtype)
    return torch.cat([scores, pad], dim=1)


def sums_of_batches(
    score: Scorer, batches: Iterator[EvalBatch], *, num_items: int, ks: Sequence[int]
) -> MetricSums:
    sums = empty_sums(num_items, ks)
    with torch.no_grad():
        for batch in batches:
            sums.add(batch_sums(widen(score(batch), num_items), batch.targets, batch.seen, ks=ks))
    return sums


def evaluate_scorer(
    score: Scorer,
    source: TableSlice,
    *,
    num_items: int,
    max_length: int,
    ks: Sequence[int],
    mask_seen: bool,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    prefetch_batches: int = 2,
) -> MetricSums:
    """Metric sums of this process's shard of ``source`` (all of it when ``world_size`` is 1)."""
    rows = DeltaBatches(source, columns=EVAL_COLUMNS, batch_size=batch_size, shuffle=False,
                        buffer_rows=batch_size, rank=rank, world_size=world_size)
    collate = partial(eval_batch, max_length=max_length, mask_seen=mask_seen)
    batches = prefetch(collate_with(rows, collate), prefetch_batches)
    return sums_of_batches(score, batches, num_items=num_items, ks=ks)


def evaluate_registered(
    model: RecommenderModel,
    source: TableSlice,
    *,
    num_items: int,
    ks: Sequence[int],
    mask_seen: bool,
    batch_size: int = 256,
) -> dict[str, float]:
    """Metrics of a registered model (``modeling.package.load_registered_model``) on ``source``,
    in process."""
    sums = evaluate_scorer(model.score_batch, source, num_items=num_items, max_length=model.spec.max_length,
                           ks=ks, mask_seen=mask_seen, batch_size=batch_size)
    return sums.means()


def _partition_sums(
    batches: Iterator[pa.RecordBatch],
    *,
    model_uri: str,
    tracking_uri: str,
    num_items: int,
    ks: Sequence[int],
    mask_seen: bool,
    batch_size: int,
) -> Iterator[pa.RecordBatch]:
    # in Spark's Python workers only: training ranks import this module without MLflow
    from recsys_spark.modeling.package import cached_registered_model

    model = cached_registered_model(model_uri, tracking_uri)
    collate = partial(eval_batch, max_length=model.spec.max_length, mask_seen=mask_seen)
    sums = sums_of_batches(model.score_batch, collate_with(batches, collate, batch_size), num_items=num_items,
                           ks=ks)
    yield pa.RecordBatch.from_pydict({"sums": [sums.as_vector().tolist()]})


def evaluate_in_spark(
    examples: DataFrame,
    *,
    model_uri: str,
    tracking_uri: str,
    num_items: int,
    ks: Sequence[int],
    mask_seen: bool,
    batch_size: int = 256,
) -> dict[str, float]:
    """Evaluate a registered model on ``examples`` (rows of one split) across Spark tasks,
    ``batch_size`` users scored at a time."""
    job = partial(_partition_sums, model_uri=model_uri, tracking_uri=tracking_uri,
                  num_items=num_items, ks=list(ks), mask_seen=mask_seen, batch_size=batch_size)
    parts = examples.select(*EVAL_COLUMNS).mapInArrow(job, "sums array<double>").collect()
    total = empty_sums(num_items, ks)
    vector = np.sum([np.asarray(r["sums"]) for r in parts], axis=0)
    total.from_vector(vector)
    return total.means()
