"""``recsys evaluate``: a registered version's full-ranking metrics on a split of the newest
gold table, computed across Spark tasks (``evaluate.evaluate_in_spark``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.sql import functions as F

from recsys_spark.config import Settings
from recsys_spark.constants import GOLD_TRAINING_EXAMPLES, SPLIT, TEST
from recsys_spark.errors import RegistryError
from recsys_spark.evaluation.evaluate import evaluate_in_spark
from recsys_spark.modeling.gold import load_training_data
from recsys_spark.modeling.package import load_registered_model
from recsys_spark.storage import Lakehouse
from recsys_spark.tracking import CHAMPION, alias_version, connect, model_uri, tracking_uri


@dataclass(frozen=True)
class VersionEvaluation:
    """``recsys evaluate``'s answer: a registered version's metrics on one split."""

    model_uri: str
    split: str
    table_version: int
    protocol: str
    metrics: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"model_uri": self.model_uri, "split": self.split, "table_version": self.table_version,
                "metrics": self.metrics, **self.metrics}


def evaluate_version(
    lake: Lakehouse, settings: Settings, *, version: str | None = None, alias: str = CHAMPION, split: str = TEST,
) -> VersionEvaluation:
    """Evaluate a registered version (``version``, or the one holding ``alias``) on ``split`` of
    the newest gold table, across Spark tasks.

    Raises:
        RegistryError: no such version or alias, or the version cannot be loaded.
    """
    from mlflow.exceptions import MlflowException

    client = connect(settings)
    name = settings.mlflow.registered_model
    if version is None:
        held = alias_version(client, name, alias)
        if held is None:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r}; train a model first")
        version = str(held.version)
    else:
        try:
            version = str(client.get_model_version(name, version).version)
        except MlflowException as exc:
            raise RegistryError(f"registered model {name!r} has no version {version!r}") from exc
    data = load_training_data(lake, settings)
    # The version, not the alias: Spark's Python workers cache models by URI, and an alias
    # may have moved since a worker loaded it.
    uri = model_uri(settings, version=version)
    store = tracking_uri(settings)
    try:  # here, not first inside a Spark task, whose failure would be pages of traceback
        load_registered_model(uri, store)
    except Exception as exc:
        raise RegistryError(f"cannot load {uri}: {type(exc).__name__}: {exc}") from exc
    rows = lake.read(GOLD_TRAINING_EXAMPLES, version=data.version).filter(F.col(SPLIT) == split)
    metrics = evaluate_in_spark(rows, model_uri=uri, tracking_uri=store, num_items=data.num_items,
                                ks=settings.evaluation.ks, mask_seen=data.mask_seen,
                                batch_size=settings.evaluation.batch_size)
    return VersionEvaluation(uri, split, data.version, data.protocol, metrics)
