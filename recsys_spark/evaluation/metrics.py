"""Full-ranking metrics: every item is a candidate, no sampled lists.

For each evaluated row the model scores all I items; items the user has already seen can be
masked out; each target's rank is the number of other candidates scoring at least as high
(ties count against the model, so a constant scorer earns nothing by luck). From the ranks:

* HIT@K — 1 if any target ranks below K;
* Recall@K — share of the row's targets that rank below K (equals HIT@K with one target);
* NDCG@K — sum over hits of 1/log2(rank + 2), divided by the ideal for min(#targets, K) hits;
* MRR — 1 / (rank of the best-ranked target + 1), untruncated;
* coverage@K — share of the catalogue appearing in at least one row's top K.

Everything is accumulated as sums (``MetricSums``), so shards of users — DDP ranks, Spark
partitions — combine by addition, and the means are taken once at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from recsys_spark.constants import MRR, metric_names


@dataclass
class MetricSums:
    """Additive per-row metric sums and the set of items recommended in top-K lists."""

    ks: tuple[int, ...]
    num_items: int
    rows: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)
    recommended: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in self.ks:
            self.recommended.setdefault(k, np.zeros(self.num_items, dtype=bool))

    def add(self, other: MetricSums) -> None:
        self.rows += other.rows
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        for k, items in other.recommended.items():
            self.recommended[k] |= items

    def as_vector(self) -> np.ndarray:
        """Flat float64 vector (rows, sums in name order, recommended flags) for all-reduce."""
        names = sorted(self.sums)
        flags = np.concatenate([self.recommended[k] for k in self.ks]).astype(np.float64)
        return np.concatenate([[self.rows], [self.sums[n] for n in names], flags])

    def from_vector(self, vector: np.ndarray) -> None:
        """Inverse of ``as_vector`` (after summing vectors, flags > 0 mean recommended)."""
        names = sorted(self.sums)
        self.rows = float(vector[0])
        for i, name in enumerate(names, start=1):
            self.sums[name] = float(vector[i])
        flags = vector[1 + len(names) :].reshape(len(self.ks), self.num_items)
        for i, k in enumerate(self.ks):
            self.recommended[k] = flags[i] > 0

    def means(self) -> dict[str, float]:
        """``hit@K``, ``ndcg@K``, ``recall@K``, ``mrr`` and ``coverage@K`` for each K."""
        if self.rows == 0:
            raise ValueError("no rows were evaluated")
        out = {name: value / self.rows for name, value in sorted(self.sums.items())}
        for k in self.ks:
            out[f"coverage@{k}"] = float(self.recommended[k].mean())
        return out


def empty_sums(num_items: int, ks: Sequence[int]) -> MetricSums:
    sums = MetricSums(tuple(ks), num_items)
    # coverage comes from the recommended items, not from sums
    sums.sums = {name: 0.0 for name in metric_names(ks) if not name.startswith("coverage@")}
    return sums


def mask_seen(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """scores (B, I) with each row's ``seen`` items (B, S), padded with -1, set to -inf."""
    rows, cols = torch.nonzero(seen >= 0, as_tuple=True)
    masked = scores.clone()
    masked[rows, seen[rows, cols]] = float("-inf")
    return masked


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, *, chunk: int = 8) -> torch.Tensor:
    """Rank (0 = best) of each target (B, T), padded with -1, among all items; ties count
    against the target. Padded entries get rank I."""
    valid = targets >= 0
    target_scores = scores.gather(1, targets.clamp(min=0))
    ranks = torch.empty_like(targets)
    for start in range(0, targets.shape[1], chunk):
        block = target_scores[:, start : start + chunk].unsqueeze(2)
        ranks[:, start : start + chunk] = (scores.unsqueeze(1) >= block).sum(-1) - 1
    # A masked target (score -inf) ties with every other masked item: never a hit.
    ranks = torch.where(torch.isinf(target_scores) & (target_scores < 0), scores.shape[1], ranks)
    return ranks.masked_fill(~valid, scores.shape[1])


def batch_sums(
    scores: torch.Tensor,
    targets: torch.Tensor,
    seen: torch.Tensor | None = None,
    *,
    ks: Sequence[int],
) -> MetricSums:
    """Metric sums of one batch. scores (B, I) over item indices 0..I-1; targets (B, T) and
    seen (B, S) item indices padded with -1. Rows without targets are skipped."""
    # A diverged model scores NaN, and NaN compares false with everything: its targets would
    # rank -1, hits with infinite gain. NaN is the worst score instead.
    scores = torch.nan_to_num(scores.detach().float(), nan=float("-inf"))
    if seen is not None and seen.numel():
        scores = mask_seen(scores, seen)
    has_targets = (targets >= 0).any(1)
    scores, targets = scores[has_targets], targets[has_targets]
    sums = empty_sums(scores.shape[1], ks)
    if not len(targets):
        return sums
    ranks = target_ranks(scores, targets)
    valid = targets >= 0
    n_targets = valid.sum(1).float()
    gains = 1.0 / torch.log2(ranks.float() + 2.0)
    # One sorted top-K for the largest K; each smaller K is its prefix.
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1)
    catalogue = scores.shape[1]
    for k in ks:
        # rank I is a masked or padded target: never a hit, even when K exceeds the catalogue
        hits = (ranks < min(k, catalogue)) & valid
        ideal = (1.0 / torch.log2(torch.arange(k, dtype=torch.float32) + 2.0)).cumsum(0)
        idcg = ideal[(n_targets.clamp(max=k) - 1).long()]
        sums.sums[f"hit@{k}"] = float(hits.any(1).float().sum())
        sums.sums[f"recall@{k}"] = float((hits.sum(1) / n_targets).sum())
        sums.sums[f"ndcg@{k}"] = float(((gains * hits).sum(1) / idcg).sum())
        values, indices = top.values[:, :k], top.indices[:, :k]
        sums.recommended[k][indices[torch.isfinite(values)].cpu().numpy()] = True
    best = ranks.min(1).values.float()
    sums.sums[MRR] = float(torch.where(best < catalogue, 1.0 / (best + 1.0), 0.0).sum())
    sums.rows = float(len(targets))
    return sums
