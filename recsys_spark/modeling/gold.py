"""The gold training table as models see it: the version a model trains and is evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.sql import functions as F

from recsys_spark.config import Settings
from recsys_spark.constants import GOLD_TRAINING_EXAMPLES, TEST, TRAIN, USER_IDX, VALIDATION, SplitProtocol
from recsys_spark.errors import InputDataError, TableNotFoundError
from recsys_spark.modeling.loader import TableSlice, count_rows
from recsys_spark.records import GoldCommit
from recsys_spark.spark import one_row
from recsys_spark.storage import Lakehouse


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on: one version of the gold table and the sizes derived from it."""

    root: str
    version: int
    commit: GoldCommit
    rows: dict[str, int]
    num_users: int
    mask_seen: bool
    table: str = GOLD_TRAINING_EXAMPLES

    @property
    def num_items(self) -> int:
        return self.commit.num_items

    @property
    def protocol(self) -> SplitProtocol:
        return self.commit.protocol

    def slice(self, split: str) -> TableSlice:
        return TableSlice(self.root, self.table, self.version, split)

    def record(self) -> dict[str, Any]:
        """What a run logs of its data (``data/versions.json``, ``data.*`` params)."""
        return {
            "table": self.table, "version": self.version, "protocol": self.protocol,
            "feature_run_id": self.commit.feature_run_id, "rows": self.rows, "num_items": self.num_items,
            "num_users": self.num_users, "mask_seen": self.mask_seen,
            "source_versions": self.commit.source_versions,
        }


def load_training_data(lake: Lakehouse, settings: Settings, version: int | None = None) -> TrainingData:
    """The gold table's current version (or ``version``), checked to hold something to train
    and evaluate on."""
    if not lake.exists(GOLD_TRAINING_EXAMPLES):
        raise TableNotFoundError(
            f"{GOLD_TRAINING_EXAMPLES} does not exist under {settings.root}: run `recsys ingest` "
            "and `recsys features` first"
        )
    if version is None:
        version = lake.version(GOLD_TRAINING_EXAMPLES)
    rows = {split: count_rows(TableSlice(lake.root, GOLD_TRAINING_EXAMPLES, version, split))
            for split in (TRAIN, VALIDATION, TEST)}
    if rows[TRAIN] == 0:
        raise InputDataError(f"{GOLD_TRAINING_EXAMPLES} v{version} has no training rows {rows}")
    if rows[VALIDATION] == 0 or rows[TEST] == 0:
        raise InputDataError(
            f"{GOLD_TRAINING_EXAMPLES} v{version} needs validation and test rows for early stopping "
            f"and gating, got {rows}; check features.split"
        )
    commit = GoldCommit.from_commit_info(GOLD_TRAINING_EXAMPLES, version,
                                         lake.commit_metadata(GOLD_TRAINING_EXAMPLES, version))
    top_user = one_row(lake.read(GOLD_TRAINING_EXAMPLES, version=version).agg(F.max(USER_IDX)))[0]
    mode = settings.evaluation.mask_history
    return TrainingData(
        root=lake.root,
        version=version,
        commit=commit,
        rows=rows,
        num_users=int(top_user) + 1,
        mask_seen=mode == "always" or (mode == "auto" and commit.protocol == "leave-one-out"),
    )
