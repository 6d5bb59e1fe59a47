"""Arrow record batches of ``gold/training_examples`` -> tensors, vectorised.

Item indices from the tables are 0..I-1; the models use ids 1..I with 0 as padding, so inputs
are shifted by one here and only here. Evaluation targets and seen items stay 0-based (they
index the score columns), padded with -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from recsys_spark.constants import HISTORY_BEHAVIORS, HISTORY_GAPS, HISTORY_ITEMS, SEEN_ITEMS, TARGETS, USER_IDX
from recsys_spark.modeling.loader import pad_left

TRAIN_COLUMNS = (USER_IDX, HISTORY_ITEMS, HISTORY_BEHAVIORS, HISTORY_GAPS)
EVAL_COLUMNS = (*TRAIN_COLUMNS, TARGETS, SEEN_ITEMS)


@dataclass
class SequenceBatch:
    """Next-item training rows. B batch, L length; ids 1..I, 0 = padding."""

    users: torch.Tensor  # (B,)
    inputs: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L) the item after each input position, 0 where none
    behaviors: torch.Tensor  # (B, L)
    gaps: torch.Tensor  # (B, L)


@dataclass
class EvalBatch:
    """Rows to rank all items for. ``targets``/``seen`` are 0-based indices padded with -1."""

    users: torch.Tensor  # (B,)
    inputs: torch.Tensor  # (B, L)
    behaviors: torch.Tensor  # (B, L)
    gaps: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, T)
    seen: torch.Tensor  # (B, S)


def pad_right(lists: pa.Array, *, fill: int = -1) -> np.ndarray:
    """(B,) list array -> (B, longest) array, values left-aligned, ``fill`` after."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    offsets = lists.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    counts = np.diff(offsets)
    width = max(int(counts.max(initial=0)), 1)
    out = np.full((len(counts), width), fill, dtype=np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    cols = np.arange(counts.sum()) - np.repeat(offsets[:-1], counts)
    out[rows, cols] = lists.flatten().to_numpy(zero_copy_only=False)
    return out


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def _trim(*arrays: np.ndarray, items: np.ndarray) -> list[np.ndarray]:
    """Drop leading columns that are padding in every row (sequences are right-aligned and
    positions are counted from the right, so this changes no result, only work)."""
    used = np.flatnonzero((items > 0).any(0))
    first = int(used[0]) if len(used) else items.shape[1] - 1
    return [a[:, first:] for a in arrays]


def sequence_batch(batch: pa.RecordBatch, max_length: int) -> SequenceBatch:
    """Training rows hold L+1 events; position t's input predicts event t+1."""
    items = pad_left(batch.column(HISTORY_ITEMS), max_length + 1, shift=1)
    inputs, following = items[:, :-1], items[:, 1:]
    behaviors = pad_left(batch.column(HISTORY_BEHAVIORS), max_length + 1)[:, :-1]
    gaps = pad_left(batch.column(HISTORY_GAPS), max_length + 1)[:, :-1]
    targets = np.where(inputs > 0, following, 0)
    inputs, targets, behaviors, gaps = _trim(inputs, targets, behaviors, gaps, items=inputs)
    return SequenceBatch(
        users=_tensor(batch.column(USER_IDX).to_numpy()),
        inputs=_tensor(inputs),
        targets=_tensor(targets),
        behaviors=_tensor(behaviors),
        gaps=_tensor(gaps),
    )


def eval_batch(batch: pa.RecordBatch, max_length: int, *, mask_seen: bool) -> EvalBatch:
    seen = pad_right(batch.column(SEEN_ITEMS)) if mask_seen else np.full((batch.num_rows, 1), -1)
    inputs = pad_left(batch.column(HISTORY_ITEMS), max_length, shift=1)
    behaviors = pad_left(batch.column(HISTORY_BEHAVIORS), max_length)
    gaps = pad_left(batch.column(HISTORY_GAPS), max_length)
    inputs, behaviors, gaps = _trim(inputs, behaviors, gaps, items=inputs)
    return EvalBatch(
        users=_tensor(batch.column(USER_IDX).to_numpy()),
        inputs=_tensor(inputs),
        behaviors=_tensor(behaviors),
        gaps=_tensor(gaps),
        targets=_tensor(pad_right(batch.column(TARGETS))),
        seen=_tensor(seen),
    )
