"""Honest baselines computed with Spark, evaluated with the same metric code as the models.

* ``popularity`` — items ranked by how often they occur in the training sequences;
* ``popularity_recent`` — by how often they occur among each user's 3 most recent training
  interactions (what is popular *now*, without reading anything after the training cut);
* ``itemcf`` — item-to-item co-occurrence within users' training sequences, cosine-normalised,
  top 100 neighbours per item; a user's scores sum the neighbours of their recent items;
* ``als`` — Spark MLlib ALS with implicit feedback on (user, item, count) of training rows.

Each fits on the ``train`` rows of ``gold/training_examples`` only and yields a scorer over the
whole catalogue; ``run_baselines`` evaluates each on validation and test and logs it as an MLflow
run in the models' experiment, so the UI compares them side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark.config import Settings
from recsys_spark.constants import (
    BASELINE_NAMES,
    GOLD_TRAINING_EXAMPLES,
    HISTORY_ITEMS,
    ITEM_IDX,
    SPLIT,
    TEST,
    TRAIN,
    USER_IDX,
    VALIDATION,
)
from recsys_spark.evaluation.evaluate import Scorer, evaluate_scorer
from recsys_spark.logs import get_logger, log_event
from recsys_spark.modeling.batches import EvalBatch
from recsys_spark.modeling.gold import load_training_data
from recsys_spark.storage import Lakehouse
from recsys_spark.tracking import connect, experiment_id, flatten, log_final_metrics, log_params

log = get_logger("baselines")

RECENT_ITEMS = 3
NEIGHBOURS = 100
CF_HISTORY = 20
ALS_PARAMS: dict[str, Any] = {"rank": 64, "reg_param": 0.05, "alpha": 20.0, "max_iter": 15, "seed": 42}


@dataclass(frozen=True)
class BaselineData:
    """Training interactions: one row per (user_idx, item_idx, position from the end)."""

    interactions: DataFrame
    num_items: int
    num_users: int


def training_interactions(examples: DataFrame) -> DataFrame:
    """(user_idx, item_idx, recency) for every item of every training sequence; recency 0 is
    the user's newest training interaction."""
    train = examples.filter(F.col(SPLIT) == TRAIN).select(USER_IDX, HISTORY_ITEMS)
    exploded = train.select(USER_IDX, F.posexplode(HISTORY_ITEMS).alias("position", ITEM_IDX),
                            F.size(HISTORY_ITEMS).alias("length"))
    return exploded.select(USER_IDX, ITEM_IDX, (F.col("length") - 1 - F.col("position")).alias("recency"))


def _counts(df: DataFrame, num_items: int) -> np.ndarray:
    counts = np.zeros(num_items, dtype=np.float32)
    for row in df.groupBy(ITEM_IDX).count().collect():
        counts[row[ITEM_IDX]] = row["count"]
    return counts


def _constant_scorer(scores: np.ndarray) -> Scorer:
    tensor = torch.from_numpy(scores)
    return lambda batch: tensor.expand(len(batch.inputs), -1)


def popularity(data: BaselineData) -> Scorer:
    return _constant_scorer(_counts(data.interactions, data.num_items))


def popularity_recent(data: BaselineData) -> Scorer:
    recent = data.interactions.filter(F.col("recency") < RECENT_ITEMS)
    # ties among recent counts are broken by overall popularity
    overall = _counts(data.interactions, data.num_items)
    return _constant_scorer(_counts(recent, data.num_items) + overall / (overall.max() + 1))


def itemcf(data: BaselineData) -> Scorer:
    """Cosine co-occurrence of items in the same user's training sequence."""
    pairs = data.interactions.select(USER_IDX, ITEM_IDX).distinct()
    item_users = pairs.groupBy(ITEM_IDX).count().withColumnRenamed("count", "n")
    co = (
        pairs.alias("a")
        .join(pairs.alias("b"), USER_IDX)
        .filter(F.col(f"a.{ITEM_IDX}") != F.col(f"b.{ITEM_IDX}"))
        .groupBy(F.col(f"a.{ITEM_IDX}").alias("i"), F.col(f"b.{ITEM_IDX}").alias("j"))
        .count()
    )
    sim = (
        co.join(item_users.withColumnRenamed(ITEM_IDX, "i").withColumnRenamed("n", "ni"), "i")
        .join(item_users.withColumnRenamed(ITEM_IDX, "j").withColumnRenamed("n", "nj"), "j")
        .select("i", "j", (F.col("count") / F.sqrt(F.col("ni") * F.col("nj"))).alias("sim"))
    )
    top = Window.partitionBy("i").orderBy(F.desc("sim"), "j")
    kept = sim.withColumn("r", F.row_number().over(top)).filter(F.col("r") <= NEIGHBOURS).collect()
    n = data.num_items
    indices = torch.tensor([[r["i"] for r in kept], [r["j"] for r in kept]], dtype=torch.long)
    matrix = torch.sparse_coo_tensor(indices, torch.tensor([r["sim"] for r in kept], dtype=torch.float32),
                                     (n, n), check_invariants=True).coalesce()
    popularity_tiebreak = torch.from_numpy(_counts(data.interactions, n) * 1e-6)

    def score(batch: EvalBatch) -> torch.Tensor:
        recent = batch.inputs[:, -CF_HISTORY:]
        profile = torch.zeros(len(recent), n)
        rows, cols = torch.nonzero(recent > 0, as_tuple=True)
        profile.index_put_((rows, recent[rows, cols] - 1), torch.ones(len(rows)), accumulate=True)
        return torch.sparse.mm(matrix.t(), profile.t()).t() + popularity_tiebreak

    return score


def als(data: BaselineData) -> Scorer:
    from pyspark.ml.recommendation import ALS

    p = ALS_PARAMS
    rank = p["rank"]
    ratings = data.interactions.groupBy(USER_IDX, ITEM_IDX).agg(F.count("*").cast("float").alias("r"))
    model = ALS(rank=rank, regParam=p["reg_param"], alpha=p["alpha"], maxIter=p["max_iter"], seed=p["seed"],
                implicitPrefs=True, userCol=USER_IDX, itemCol=ITEM_IDX, ratingCol="r",
                coldStartStrategy="nan").fit(ratings)
    users = np.zeros((data.num_users, rank), dtype=np.float32)
    for row in model.userFactors.collect():
        users[row["id"]] = row["features"]
    items = np.zeros((data.num_items, rank), dtype=np.float32)
    for row in model.itemFactors.collect():
        items[row["id"]] = row["features"]
    user_t, item_t = torch.from_numpy(users), torch.from_numpy(items)

    def score(batch: EvalBatch) -> torch.Tensor:
        known = (batch.users >= 0) & (batch.users < data.num_users)
        vectors = user_t[batch.users.clamp(0, data.num_users - 1)] * known.unsqueeze(1)
        return vectors @ item_t.T

    return score


FITTERS: dict[str, Callable[[BaselineData], Scorer]] = {
    "popularity": popularity,
    "popularity_recent": popularity_recent,
    "itemcf": itemcf,
    "als": als,
}


def fit(name: str, data: BaselineData) -> tuple[Scorer, float]:
    if name not in FITTERS:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(FITTERS)}")
    started = time.perf_counter()
    scorer = FITTERS[name](data)
    return scorer, time.perf_counter() - started


def describe(name: str) -> dict[str, Any]:
    params: dict[str, Any] = {"baseline": name}
    if name == "popularity_recent":
        params["recent_items"] = RECENT_ITEMS
    if name == "itemcf":
        params.update(neighbours=NEIGHBOURS, history=CF_HISTORY)
    if name == "als":
        params.update(ALS_PARAMS)
    return params


def run_baselines(lake: Lakehouse, settings: Settings, names: tuple[str, ...] = BASELINE_NAMES) -> list[dict[str, Any]]:
    """Fit each baseline on the train split, evaluate it on validation and test with the models'
    metric code, and log it as an MLflow run of the models' experiment."""
    unknown = [n for n in names if n not in FITTERS]
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(FITTERS)}")
    client = connect(settings)
    data = load_training_data(lake, settings)
    examples = lake.read(GOLD_TRAINING_EXAMPLES, version=data.version)
    interactions = training_interactions(examples).cache()
    inputs = BaselineData(interactions, data.num_items, data.num_users)
    experiment = experiment_id(client, settings)
    results = []
    try:
        for name in names:
            run = client.create_run(experiment, run_name=f"baseline-{name}",
                                    tags={"recsys.kind": "baseline", "recsys.model": name})
            run_id = run.info.run_id
            try:
                scorer, fit_seconds = fit(name, inputs)
                metrics = {
                    split: evaluate_scorer(scorer, data.slice(split), num_items=data.num_items,
                                           max_length=settings.model_max_length, ks=settings.evaluation.ks,
                                           mask_seen=data.mask_seen,
                                           batch_size=settings.evaluation.batch_size).means()
                    for split in (VALIDATION, TEST)
                }
                log_params(client, run_id, flatten({**describe(name), "data": {
                    "version": data.version, "protocol": data.protocol, "num_items": data.num_items}}))
                log_final_metrics(client, run_id, metrics[TEST], "test_")
                log_final_metrics(client, run_id, metrics[VALIDATION], "best_val_")
                log_final_metrics(client, run_id, {"fit_seconds": fit_seconds}, "")
            except BaseException:
                client.set_terminated(run_id, "FAILED")
                raise
            client.set_terminated(run_id, "FINISHED")
            log_event(log, "baseline.done", baseline=name, run_id=run_id, seconds=round(fit_seconds, 1),
                      **{f"test_{k}": round(v, 5) for k, v in metrics[TEST].items() if k in ("ndcg@10", "hit@10")})
            results.append({"baseline": name, "run_id": run_id, "fit_seconds": round(fit_seconds, 1),
                            "test": metrics[TEST], "validation": metrics[VALIDATION]})
    finally:
        interactions.unpersist()
    return results
