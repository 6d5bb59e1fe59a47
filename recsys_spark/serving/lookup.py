"""The read path: a user's current list in well under a millisecond after warm-up.

``RecommendationLookup`` keeps an in-memory snapshot of ``serving/recommendations`` (one entry
per user: of its batch and nearline rows, the one that saw the newer event), of the cold-start
list and of the purchases gold knows (a list never offers what the user bought since it was
written), and reloads it when either table's Delta version moves — checked at most every
``refresh_seconds``, so a lookup is a dict access, not a table scan. Reads go through the
storage package's Spark-free read API: no Spark session needed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_spark.constants import (
    BOUGHT_ITEMS,
    CATEGORY_ID,
    GENERATED_AT,
    GOLD_ITEM_FEATURES,
    GOLD_USER_SEQUENCES,
    ITEM_ID,
    ITEM_IDS,
    ITEM_IDX,
    LAST_EVENT_TS,
    MODEL_NAME,
    MODEL_VERSION,
    SCORES,
    SERVING_RECOMMENDATIONS,
    SILVER_ITEM_INDEX,
    SOURCE,
    USER_ID,
)
from recsys_spark.serving.rules import POPULARITY_FALLBACK, BusinessRules, Catalogue, popularity
from recsys_spark.storage import read_table, table_version


@dataclass(frozen=True)
class Recommendation:
    user_id: int
    item_ids: list[int]
    scores: list[float] | None
    source: str  # batch | nearline | cold_start
    model_version: str | None
    generated_at: datetime | None
    cold_start: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "item_ids": self.item_ids,
            "scores": self.scores,
            "source": self.source,
            "model_version": self.model_version,
            "generated_at": None if self.generated_at is None else self.generated_at.isoformat(),
            "cold_start": self.cold_start,
        }


@dataclass
class _Snapshot:
    version: int | None  # None: no table yet (every user is cold)
    gold_version: int | None
    rows: dict[int, int]  # user id -> row of ``table``
    table: pa.Table
    popular: list[int]
    bought: dict[int, set[int]]  # user id -> raw ids of every item gold knows they bought


def gold_purchases(root: str, version: int | None) -> dict[int, set[int]]:
    """User id -> raw ids of the items ``gold/user_sequences`` (as of ``version``) knows they
    bought: purchases batch ingest brought in after a user's nearline list was written."""
    if version is None:
        return {}
    sequences = read_table(root, GOLD_USER_SEQUENCES, version=version, columns=[USER_ID, BOUGHT_ITEMS])
    sequences = sequences.filter(pc.greater(pc.list_value_length(sequences.column(BOUGHT_ITEMS)), 0))
    if sequences.num_rows == 0:
        return {}
    index = read_table(root, SILVER_ITEM_INDEX, columns=[ITEM_IDX, ITEM_ID])
    raw = np.full(int(pc.max(index.column(ITEM_IDX)).as_py()) + 1, -1, dtype=np.int64)
    raw[index.column(ITEM_IDX).to_numpy()] = index.column(ITEM_ID).to_numpy()
    lists = sequences.column(BOUGHT_ITEMS).combine_chunks()
    items = raw[lists.flatten().to_numpy()]
    offsets = lists.offsets.to_numpy()
    return {user: set(items[offsets[i]:offsets[i + 1]].tolist())
            for i, user in enumerate(sequences.column(USER_ID).to_pylist())}


def popular_items(root: str, k: int, rules: BusinessRules | None = None) -> list[int]:
    """Cold-start list: the most popular items (``rules.popularity``) within the ``rules``'
    allowed categories; ties by item id."""
    version = table_version(root, GOLD_ITEM_FEATURES)
    if version is None:
        return []
    table = read_table(root, GOLD_ITEM_FEATURES, version=version)
    if rules is not None and CATEGORY_ID in table.column_names:
        categories = table.column(CATEGORY_ID).fill_null(-1).to_numpy()
        table = table.filter(pa.array(Catalogue(categories).allowed(rules)))
    order = np.lexsort((table.column(ITEM_ID).to_numpy(), -popularity(table)))[:k]
    return table.column(ITEM_ID).to_numpy()[order].tolist()


class RecommendationLookup:
    """``lookup.get(user_id, k)``: the user's list (of batch and nearline, the one that saw the
    newer event), or the cold-start list flagged as such. Thread-safe; unknown users are not an
    error."""

    def __init__(
        self, root: str, *, refresh_seconds: float = 1.0, cold_start_k: int = 50,
        rules: BusinessRules | None = None,
    ) -> None:
        self.root = root
        self.rules = rules  # the cold-start list obeys the same category rules as scoring
        self.refresh_seconds = refresh_seconds
        self.cold_start_k = cold_start_k
        self._lock = threading.Lock()
        self._checked = 0.0
        self._snapshot = self._load(*self._versions())

    @property
    def version(self) -> int | None:
        return self._snapshot.version

    def _versions(self) -> tuple[int | None, int | None]:
        return table_version(self.root, SERVING_RECOMMENDATIONS), table_version(self.root, GOLD_USER_SEQUENCES)

    def _load(self, version: int | None, gold_version: int | None) -> _Snapshot:
        popular = popular_items(self.root, self.cold_start_k, self.rules)
        filtered = self.rules is None or self.rules.exclude_bought
        bought = gold_purchases(self.root, gold_version) if filtered else {}
        if version is None:
            return _Snapshot(version, gold_version, {}, pa.table({}), popular, bought)
        table = read_table(self.root, SERVING_RECOMMENDATIONS, version=version, columns=[
            USER_ID, ITEM_IDS, SCORES, SOURCE, MODEL_NAME, MODEL_VERSION, GENERATED_AT, LAST_EVENT_TS])
        # Per user, the row that saw the newest event wins, then the newer row: a batch run of
        # tonight's model over yesterday's gold must not undo what the stream saw since. Sorted
        # ascending, later rows overwrite earlier ones in ``rows``.
        table = table.take(pc.sort_indices(table, [(LAST_EVENT_TS, "ascending", "at_start"),
                                                   (GENERATED_AT, "ascending", "at_start")]))
        users = table.column(USER_ID).to_numpy()
        rows = dict(zip(users.tolist(), range(len(users)), strict=True))
        return _Snapshot(version, gold_version, rows, table, popular, bought)

    def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_seconds:
            return
        with self._lock:
            self._checked = now
            versions = self._versions()
            if versions != (self._snapshot.version, self._snapshot.gold_version):
                self._snapshot = self._load(*versions)

    def get(self, user_id: int, k: int = 10) -> Recommendation:
        self.refresh()
        snapshot = self._snapshot
        row = snapshot.rows.get(int(user_id))
        if row is None:
            return Recommendation(int(user_id), snapshot.popular[:k], None, "cold_start", None, None, True)
        table = snapshot.table
        items, scores = table.column(ITEM_IDS)[row].as_py(), table.column(SCORES)[row].as_py()
        bought = snapshot.bought.get(int(user_id))
        if bought:  # bought since the list was written (a batch ingest): never offered again
            kept = [i for i, item in enumerate(items) if item not in bought]
            items, scores = [items[i] for i in kept], [scores[i] for i in kept]
        return Recommendation(
            user_id=int(user_id),
            item_ids=items[:k],
            scores=scores[:k],
            source=table.column(SOURCE)[row].as_py(),
            model_version=table.column(MODEL_VERSION)[row].as_py(),
            generated_at=table.column(GENERATED_AT)[row].as_py(),
            cold_start=table.column(MODEL_NAME)[row].as_py() == POPULARITY_FALLBACK,
        )
