"""The champion model plus business rules: histories in, ranked raw item ids out.

``RuleScorer`` is the one scoring path of batch (``score_all_users``, distributed with
``mapInPandas``: each Python worker loads the champion once) and nearline (the streaming sink).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from recsys_spark.config import Settings
from recsys_spark.constants import (
    BATCH_SOURCE,
    BEHAVIOR,
    CATEGORY_ID,
    GENERATED_AT,
    GOLD_ITEM_FEATURES,
    GOLD_USER_SEQUENCES,
    INTRA_LIST_DIVERSITY,
    ITEM_ID,
    ITEM_IDS,
    ITEM_IDX,
    LAST_EVENT_TS,
    MODEL_NAME,
    MODEL_VERSION,
    SCORES,
    SEQUENCE_ITEMS,
    SERVING_ITEM_EMBEDDINGS,
    SERVING_RECOMMENDATIONS,
    SERVING_USER_STATE,
    SILVER_EVENTS,
    SOURCE,
    STREAM_BATCH_ID,
    USER_ID,
    USER_IDX,
)
from recsys_spark.errors import NoChampionError
from recsys_spark.logs import get_logger, log_event, log_event_at
from recsys_spark.modeling.batches import EvalBatch
from recsys_spark.modeling.loader import pad_left
from recsys_spark.modeling.package import RecommenderModel, cached_registered_model, load_registered_model
from recsys_spark.serving.rules import (
    POPULARITY_FALLBACK,
    BusinessRules,
    Catalogue,
    apply_rules,
    intra_list_diversity,
    popularity,
    popularity_columns,
)
from recsys_spark.serving.schemas import RECOMMENDATION_SCHEMA, STATE_BOUGHT
from recsys_spark.spark import one_row
from recsys_spark.storage import Lakehouse
from recsys_spark.tracking import CHAMPION, alias_version, connect, model_uri, tracking_uri

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = get_logger("serving")



@dataclass
class Champion:
    """A registry version of the model, as loaded for serving."""

    version: str
    model: RecommenderModel

    @property
    def name(self) -> str:
        return self.model.spec.name


def champion_version(settings: Settings) -> str:
    found = alias_version(connect(settings), settings.mlflow.registered_model, CHAMPION)
    if found is None:
        raise NoChampionError(
            f"registered model {settings.mlflow.registered_model!r} has no champion: run `recsys train`"
        )
    return str(found.version)


def load_champion(settings: Settings, version: str | None = None, *, cached: bool = False) -> Champion:
    """The champion (or ``version``), its files verified; ``cached``: once per process."""
    version = version or champion_version(settings)
    load = cached_registered_model if cached else load_registered_model
    return Champion(version, load(model_uri(settings, version=version), tracking_uri(settings)))


def item_catalogue(lake: Lakehouse, num_items: int, embeddings: np.ndarray | None = None) -> Catalogue:
    """What the rules know of items 0..I-1, from gold/item_features: raw category ids (-1
    unknown) and popularity (0 unknown)."""
    categories = np.full(num_items, -1, dtype=np.int64)
    counts = np.zeros(num_items)
    if lake.exists(GOLD_ITEM_FEATURES):
        features = lake.read(GOLD_ITEM_FEATURES)
        rows = features.select(ITEM_IDX, CATEGORY_ID, *popularity_columns(features.columns)).filter(
            F.col(ITEM_IDX) < num_items).toArrow()
        index = rows.column(ITEM_IDX).to_numpy()
        categories[index] = rows.column(CATEGORY_ID).fill_null(-1).to_numpy()
        counts[index] = popularity(rows)
    return Catalogue(categories, embeddings, counts)


@dataclass
class RankedLists:
    """``RuleScorer.recommend``'s answer, one entry per user."""

    items: list[list[int]]  # raw item ids, best first
    scores: list[list[float]]
    diversity: np.ndarray
    fallback: np.ndarray  # bool: ranked by popularity, the champion knowing nothing of the user

    def model_names(self, champion: str) -> list[str]:
        return [POPULARITY_FALLBACK if f else champion for f in self.fallback]


@dataclass
class RuleScorer:
    """Score histories with a champion and apply the business rules."""

    champion: Champion
    catalogue: Catalogue
    rules: BusinessRules

    @classmethod
    def build(cls, lake: Lakehouse, settings: Settings, champion: Champion) -> RuleScorer:
        rules = BusinessRules.from_settings(settings.serving)
        embeddings = champion.model.item_embeddings() if rules.diversity_by == "embedding" else None
        return cls(champion, item_catalogue(lake, champion.model.num_items, embeddings), rules)

    def recommend(self, histories: list[np.ndarray], users: np.ndarray, bought: list[np.ndarray]) -> RankedLists:
        """Histories and purchases as item indices (oldest first) -> ranked raw ids.

        Users the champion knows nothing about (a sequence model given only items it was not
        trained on, a user model an unknown user) would get item index or item bias order; they
        are ranked by popularity instead, under the same rules."""
        model = self.champion.model
        length = model.spec.max_length
        # Items indexed after the champion was trained (the dictionary only grows) are unknown
        # to it: left out of its input, so the known ones keep their recent positions (the
        # model itself would only blank them in place). Users it never saw it masks itself.
        histories = [h[h < model.num_items] for h in histories]
        bought = [b[b < model.num_items] for b in bought]
        inputs = pad_left(pa.array([h.astype(np.int64) for h in histories], pa.list_(pa.int64())), length,
                          shift=1)
        tensor = torch.from_numpy(inputs)
        zeros = torch.zeros_like(tensor)
        empty = torch.full((len(histories), 1), -1)
        batch = EvalBatch(users=torch.from_numpy(users.astype(np.int64)), inputs=tensor, behaviors=zeros,
                          gaps=zeros, targets=empty, seen=empty)
        scores = model.score_batch(batch)
        popular = self.catalogue.popularity
        fallback = model.uninformed(batch) & (popular is not None)
        if fallback.any():
            scores[torch.from_numpy(fallback)] = torch.from_numpy(self._popularity_ranks).to(scores.dtype)
        indices, values = apply_rules(scores, bought, self.catalogue, self.rules)
        if popular is not None and fallback.any():  # report interactions, not ranks
            values[fallback] = np.where(indices[fallback] >= 0, popular[indices[fallback]], np.nan)
        raw = model.item_ids
        return RankedLists(
            items=[raw[row[row >= 0]].tolist() for row in indices],
            scores=[row[np.isfinite(row)].astype(float).tolist() for row in values],
            diversity=intra_list_diversity(indices, self.catalogue.categories),
            fallback=fallback,
        )

    @cached_property
    def _popularity_ranks(self) -> np.ndarray:
        """(I,) I - rank by popularity, ties by raw item id as in the cold-start list: exact in
        float32 (counts plus a tie-breaking fraction would not be), and topk needs no ties."""
        popular = self.catalogue.popularity
        if popular is None:
            raise ValueError("the catalogue has no popularity to rank by")
        order = np.lexsort((self.champion.model.item_ids, -popular))
        ranks = np.empty(len(order))
        ranks[order] = len(order) - np.arange(len(order))
        return ranks


# --- batch scoring ------------------------------------------------------------------------------

def _score_partition(
    frames: Iterator[pd.DataFrame], *, settings: Settings, version: str, catalogue: Catalogue,
    rules: BusinessRules, generated_at: datetime,
) -> Iterator[pd.DataFrame]:
    # The model is loaded once per Python worker; rules and catalogue come with each job.
    scorer = RuleScorer(load_champion(settings, version, cached=True), catalogue, rules)
    for frame in frames:
        histories = [np.asarray(h, dtype=np.int64) for h in frame[SEQUENCE_ITEMS]]
        model = scorer.champion.model
        bought = [np.concatenate([np.asarray(b if b is not None else [], dtype=np.int64),
                                  model.item_index(np.asarray(s if s is not None else [], dtype=np.int64))])
                  for b, s in zip(frame["bought"], frame["stream_bought"], strict=True)]
        ranked = scorer.recommend(histories, frame[USER_IDX].to_numpy(), bought)
        yield pd.DataFrame({
            USER_ID: frame[USER_ID], USER_IDX: frame[USER_IDX], ITEM_IDS: ranked.items, SCORES: ranked.scores,
            MODEL_NAME: ranked.model_names(scorer.champion.name), MODEL_VERSION: version,
            GENERATED_AT: generated_at, LAST_EVENT_TS: frame[LAST_EVENT_TS], STREAM_BATCH_ID: None,
            INTRA_LIST_DIVERSITY: ranked.diversity, SOURCE: BATCH_SOURCE,
        })


def score_all_users(
    spark: SparkSession, lake: Lakehouse, settings: Settings, *, generated_at: datetime | None = None
) -> dict[str, Any]:
    """Top-K for every user of gold/user_sequences into serving/recommendations (source=batch),
    replacing the previous batch rows in one commit; nearline rows are left alone. Bought means
    bought in silver or seen bought by the stream (serving/user_state), which may be ahead.
    ``generated_at`` stamps the rows (default: now)."""
    started = time.perf_counter()
    champion = load_champion(settings)
    scorer = RuleScorer.build(lake, settings, champion)
    bought = (lake.read(SILVER_EVENTS).filter(F.col(BEHAVIOR) == "buy")
              .groupBy(USER_IDX).agg(F.collect_set(ITEM_IDX).alias("bought")))
    users = lake.read(GOLD_USER_SEQUENCES).select(USER_IDX, USER_ID, SEQUENCE_ITEMS, LAST_EVENT_TS)
    if lake.exists(SERVING_USER_STATE):  # raw ids: mapped by the champion in the workers
        users = users.join(lake.read(SERVING_USER_STATE).select(USER_ID, F.col(STATE_BOUGHT).alias("stream_bought")),
                           USER_ID, "left")
    else:
        users = users.withColumn("stream_bought", F.lit(None).cast("array<long>"))
    job = partial(_score_partition, settings=settings, version=champion.version, catalogue=scorer.catalogue,
                  rules=scorer.rules, generated_at=generated_at or datetime.now(UTC))
    rows = users.join(bought, USER_IDX, "left").mapInPandas(job, from_arrow_schema(RECOMMENDATION_SCHEMA))
    written = lake.write(rows, SERVING_RECOMMENDATIONS, mode="overwrite", partition_by=(SOURCE,),
                         partition_filters=[(SOURCE, "=", BATCH_SOURCE)],
                         commit_info={MODEL_VERSION: champion.version})
    batch_rows = lake.read(SERVING_RECOMMENDATIONS, version=written.version).filter(F.col(SOURCE) == BATCH_SOURCE)
    stats = one_row(batch_rows.agg(
        F.count("*").alias("users"),
        F.count_distinct(USER_ID).alias("distinct_users"),
        F.avg(INTRA_LIST_DIVERSITY).alias("diversity"),
        F.avg(F.size(ITEM_IDS)).alias("mean_k"),
    ))
    distinct_items = batch_rows.select(F.explode(ITEM_IDS)).distinct().count()
    embeddings_version = _write_item_embeddings(spark, lake, champion)
    report = {
        "model_name": champion.name,
        "model_version": champion.version,
        "users": stats["users"],
        "distinct_users": stats["distinct_users"],
        "mean_list_length": round(float(stats["mean_k"] or 0), 2),
        "catalogue_coverage": round(distinct_items / champion.model.num_items, 4),
        "intra_list_diversity": round(float(stats["diversity"] or 0), 4),
        "table_version": written.version,
        "item_embeddings_version": embeddings_version,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if stats["users"] and not stats["mean_k"]:
        log_event_at(log, logging.WARNING, "score_batch.empty_lists", users=stats["users"],
                  hint="the business rules leave no item: check serving.category_allow / category_deny")
    log_event(log, "score_batch.done", **report)
    return report


def _write_item_embeddings(spark: SparkSession, lake: Lakehouse, champion: Champion) -> int:
    vectors = champion.model.item_embeddings()
    ids = champion.model.item_ids
    table = pa.table({
        ITEM_IDX: pa.array(np.arange(len(ids)), pa.int32()),
        ITEM_ID: pa.array(ids, pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()),
                                                       vectors.shape[1]).cast(pa.list_(pa.float32())),
        MODEL_NAME: pa.array([champion.name] * len(ids)),
        MODEL_VERSION: pa.array([champion.version] * len(ids)),
    })
    return lake.write(spark.createDataFrame(table), SERVING_ITEM_EMBEDDINGS, mode="overwrite").version
