"""Business rules, applied in one place for batch and nearline scoring alike.

Given a (B, I) score matrix over the model's catalogue: mask what may not be shown (items the
user bought, denied or not-allowed categories), take the top ``candidates``, and re-rank them
with maximal marginal relevance (MMR) when ``diversity_lambda`` > 0:

    next = argmax_c (1 - λ) · rel(c) - λ · max_{s selected} sim(c, s)

with relevance min-max scaled per user and ``sim`` either "same category" (0/1) or the cosine
of item embeddings. λ = 0 is exactly the relevance order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from recsys_spark.config import ServingSettings
from recsys_spark.constants import BEHAVIORS

# ``model_name`` of a serving row ranked by popularity because the champion had nothing to go
# on (every item of the history unknown to it): the lookup reports such a list as cold start.
POPULARITY_FALLBACK = "popularity"


@dataclass(frozen=True)
class BusinessRules:
    """The serving settings' rules (``from_settings``; their defaults are the config's)."""

    k: int
    exclude_bought: bool
    category_allow: tuple[int, ...] | None
    category_deny: tuple[int, ...]
    diversity_lambda: float
    diversity_by: str
    candidates: int

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> BusinessRules:
        return cls(
            k=settings.k,
            exclude_bought=settings.exclude_bought,
            category_allow=tuple(settings.category_allow) if settings.category_allow is not None else None,
            category_deny=tuple(settings.category_deny),
            diversity_lambda=settings.diversity_lambda,
            diversity_by=settings.diversity_by,
            candidates=max(settings.candidates, settings.k),
        )


@dataclass(frozen=True)
class Catalogue:
    """What the rules know about items 0..I-1: raw category ids and, optionally, embeddings."""

    categories: np.ndarray  # (I,) int64, -1 unknown
    embeddings: np.ndarray | None = None  # (I, D) float32
    popularity: np.ndarray | None = None  # (I,) interactions, see ``popularity``

    def allowed(self, rules: BusinessRules) -> np.ndarray:
        ok = np.ones(len(self.categories), dtype=bool)
        if rules.category_allow is not None:
            ok &= np.isin(self.categories, rules.category_allow)
        if rules.category_deny:
            ok &= ~np.isin(self.categories, rules.category_deny)
        return ok


def popularity_columns(names: Sequence[str]) -> list[str]:
    """The count columns of gold/item_features that ``popularity`` adds up: every behaviour over
    the shortest window of at least 7 days (the longest there is, if all are shorter)."""
    windows = sorted({int(name.rsplit("_", 1)[1][:-1]) for name in names
                      if name.startswith(tuple(f"{b}_" for b in BEHAVIORS)) and name.endswith("d")
                      and name.rsplit("_", 1)[1][:-1].isdigit()})
    if not windows:
        return []
    window = next((w for w in windows if w >= 7), windows[-1])
    return [f"{b}_{window}d" for b in BEHAVIORS if f"{b}_{window}d" in names]


def popularity(item_features: pa.Table) -> np.ndarray:
    """Interactions per row of ``item_features`` (see ``popularity_columns``): the cold-start
    ranking, and the fallback for users the champion knows nothing about."""
    counts = np.zeros(item_features.num_rows)
    for name in popularity_columns(item_features.column_names):
        counts += item_features.column(name).fill_null(0).to_numpy().astype(float)
    return counts


def apply_rules(
    scores: torch.Tensor, bought: list[np.ndarray], catalogue: Catalogue, rules: BusinessRules
) -> tuple[np.ndarray, np.ndarray]:
    """(B, I) scores -> (indices, scores), each (B, K); index -1 pads rows with fewer than K
    eligible items. ``bought[b]`` holds item indices 0..I-1 of user b's purchases."""
    scores = scores.detach().float().clone()
    scores[:, torch.from_numpy(~catalogue.allowed(rules))] = float("-inf")
    if rules.exclude_bought:
        rows = np.repeat(np.arange(len(bought)), [len(b) for b in bought])
        cols = np.concatenate(bought).astype(np.int64) if bought else np.zeros(0, np.int64)
        keep = (cols >= 0) & (cols < scores.shape[1])  # -1: an item the model does not know
        scores[torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep])] = float("-inf")
    width = min(rules.candidates if rules.diversity_lambda > 0 else rules.k, scores.shape[1])
    top = scores.topk(width, dim=1)
    values, indices = top.values.numpy(), top.indices.numpy().astype(np.int64)
    if rules.diversity_lambda > 0:
        order, picked = _mmr(values, indices, catalogue, rules)
        values = np.where(picked, np.take_along_axis(values, order, 1), -np.inf)
        indices = np.take_along_axis(indices, order, 1)
    values, indices = values[:, : rules.k], indices[:, : rules.k]
    invalid = ~np.isfinite(values)
    indices[invalid] = -1
    values[invalid] = np.nan
    return indices, values


def _mmr(
    values: np.ndarray, indices: np.ndarray, catalogue: Catalogue, rules: BusinessRules
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy MMR order of each row's candidates (vectorised over rows), first K positions, and
    whether each position holds an eligible candidate (a row may have fewer than K)."""
    rows, width = values.shape
    finite = np.isfinite(values)
    low = np.where(finite, values, np.inf).min(1, keepdims=True)
    high = np.where(finite, values, -np.inf).max(1, keepdims=True)
    relevance = np.where(finite, (values - low) / np.maximum(high - low, 1e-12), -np.inf)
    similarity = _similarity(indices, catalogue, rules.diversity_by)  # (B, W, W)
    lam = rules.diversity_lambda
    chosen = np.zeros((rows, width), dtype=bool)
    max_sim = np.zeros((rows, width))
    order = np.zeros((rows, min(rules.k, width)), dtype=np.int64)
    picked = np.zeros(order.shape, dtype=bool)
    every = np.arange(rows)
    for step in range(order.shape[1]):
        # masked candidates stay -inf whatever λ (at λ = 1, 0 · -inf would be NaN, which argmax takes)
        gain = np.where(chosen | ~finite, -np.inf, (1 - lam) * np.where(finite, relevance, 0) - lam * max_sim)
        pick = gain.argmax(1)
        order[:, step] = pick
        picked[:, step] = np.isfinite(gain[every, pick])  # else every eligible one is taken
        chosen[every, pick] = True
        max_sim = np.maximum(max_sim, similarity[every, pick])
    return order, picked


def _similarity(indices: np.ndarray, catalogue: Catalogue, by: str) -> np.ndarray:
    if by == "embedding" and catalogue.embeddings is not None:
        vectors = catalogue.embeddings[indices]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return np.einsum("bid,bjd->bij", vectors, vectors)
    categories = catalogue.categories[indices]
    return ((categories[:, :, None] == categories[:, None, :]) & (categories[:, :, None] >= 0)).astype(float)


def intra_list_diversity(indices: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Per row: the share of pairs of recommended items in different categories (1 = all differ)."""
    result = np.zeros(len(indices))
    for row, items in enumerate(indices):
        items = items[items >= 0]
        n = len(items)
        if n < 2:
            continue
        _, counts = np.unique(categories[items], return_counts=True)
        same = (counts * (counts - 1)).sum() / 2
        result[row] = 1 - same / (n * (n - 1) / 2)
    return result
