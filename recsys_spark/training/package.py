"""How a trained model is packaged in MLflow, and loaded back — only through the registry.

Each run logs two models:

* ``recommender`` — an ``mlflow.pyfunc`` model that takes raw item ids and returns raw item ids:
  ``predict(pd.DataFrame({"history": [[raw ids, oldest first]], "user_id": [...]}),
  params={"k": 10})`` -> columns ``item_ids`` and ``scores`` (a history of only unknown items,
  where the network has nothing to go on, is ranked by training popularity, the share of
  training interactions being its score). This is the registered model (the
  champion/challenger aliases point at its versions); scoring and evaluation load it.
* ``torch_model`` — the plain ``nn.Module`` via ``mlflow.pytorch.log_model`` (a ``ScoringModule``
  mapping (B, L) item ids 1..I to (B, I) scores), for people who want the network itself.

Weights are stored as a state dict and loaded with ``torch.load(weights_only=True)``; the
architecture is JSON; the id dictionaries are Parquet.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.pyfunc import PythonModel
from torch import nn

from recsys_spark.training.batches import EvalBatch
from recsys_spark.training.tasks import ModelSpec, Task, get_task

if TYPE_CHECKING:
    from mlflow.pyfunc import PythonModelContext

ARCHITECTURE = "architecture"
WEIGHTS = "weights"
ITEMS = "items"
USERS = "users"
POPULARITY = "train_share"
PIP_REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    "mlflow==3.17.2",
    "pandas",
    "pyarrow",
    "numpy",
    "recsys-spark",
]


class ScoringModule(nn.Module):
    """(B, L) item ids 1..I (for ``mf``: (B,) user indices) -> (B, I) scores."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequences = x if x.dim() == 2 else x.unsqueeze(1)
        empty = torch.full((len(x), 1), -1, dtype=torch.long)
        batch = EvalBatch(users=x if x.dim() == 1 else torch.zeros(len(x), dtype=torch.long),
                          inputs=sequences, behaviors=torch.zeros_like(sequences),
                          gaps=torch.zeros_like(sequences), targets=empty, seen=empty)
        return self.task.scores(self.model, batch)


def write_artifacts(folder: Path, spec: ModelSpec, state: dict[str, torch.Tensor], items: pa.Table,
                    users: pa.Table | None) -> dict[str, str]:
    """Files of the pyfunc model; returns the ``artifacts`` mapping for ``log_model``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "architecture.json").write_text(json.dumps(spec.architecture(), indent=2))
    torch.save(state, folder / "weights.pt")
    if spec.log_q is not None:  # each item's share of the training interactions
        items = items.append_column(POPULARITY, pa.array(np.exp(spec.log_q)[items.column("item_idx").to_numpy()]))
    pq.write_table(items, folder / "items.parquet")
    artifacts = {
        ARCHITECTURE: str(folder / "architecture.json"),
        WEIGHTS: str(folder / "weights.pt"),
        ITEMS: str(folder / "items.parquet"),
    }
    if users is not None:
        pq.write_table(users, folder / "users.parquet")
        artifacts[USERS] = str(folder / "users.parquet")
    return artifacts


class RecommenderModel(PythonModel):
    """The registered pyfunc: raw ids in, ranked raw ids out (see module docstring)."""

    def load_context(self, context: PythonModelContext) -> None:
        architecture = json.loads(Path(context.artifacts[ARCHITECTURE]).read_text())
        self.spec = ModelSpec(**architecture)
        self.task = get_task(self.spec.name)
        self.model = self.task.build(self.spec)
        self.model.load_state_dict(torch.load(context.artifacts[WEIGHTS], map_location="cpu",
                                              weights_only=True))
        self.model.eval()
        items = pq.read_table(context.artifacts[ITEMS])
        self.item_ids = _by_index(items, "item_idx", "item_id", self.spec.num_items)
        self.popularity = None  # versions registered before it was packaged have none
        if POPULARITY in items.column_names:
            self.popularity = np.zeros(self.spec.num_items, dtype=np.float32)
            index = items.column("item_idx").to_numpy()
            keep = index < self.spec.num_items
            self.popularity[index[keep]] = items.column(POPULARITY).to_numpy()[keep]
        self._item_sorted, self._item_order = _lookup(self.item_ids)
        self.user_ids = None
        if USERS in context.artifacts:
            users = pq.read_table(context.artifacts[USERS])
            self.user_ids = _by_index(users, "user_idx", "user_id", self.spec.num_users)
            self._user_sorted, self._user_order = _lookup(self.user_ids)

    @property
    def num_items(self) -> int:
        return self.spec.num_items

    def score_batch(self, batch: EvalBatch) -> torch.Tensor:
        """(B, I) scores over this model's catalogue (item indices 0..I-1)."""
        with torch.no_grad():
            return self.task.scores(self.model, self._known(batch))

    def uninformed(self, batch: EvalBatch) -> np.ndarray:
        """(B,) rows this model knows nothing about: no known item in the history, or for a
        user model an unknown user. Its scores there rank by item index or bias, not by user."""
        batch = self._known(batch)
        if self.task.personalised_by == "user":
            return (batch.users < 0).numpy()
        return (batch.inputs == 0).all(1).numpy()

    def _known(self, batch: EvalBatch) -> EvalBatch:
        """``batch`` with items and users indexed after this model was trained (the dictionaries
        only grow) made padding and unknown: an older champion is still evaluated and served."""
        unknown_item = batch.inputs > self.spec.num_items  # inputs are item indices + 1
        return replace(batch, inputs=batch.inputs.masked_fill(unknown_item, 0),
                       behaviors=batch.behaviors.masked_fill(unknown_item, 0),
                       gaps=batch.gaps.masked_fill(unknown_item, 0),
                       users=batch.users.masked_fill(batch.users >= self.spec.num_users, -1))

    def item_embeddings(self) -> np.ndarray:
        """(I, D) item vectors of this model (row i = item index i)."""
        with torch.no_grad():
            return self.task.item_embeddings(self.model).float().numpy()

    def item_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """Raw item ids -> dense indices, -1 for items this model does not know."""
        return _find(self._item_sorted, self._item_order, raw_ids)

    def user_index(self, raw_ids: np.ndarray) -> np.ndarray:
        if self.user_ids is None:
            return np.full(len(raw_ids), -1)
        return _find(self._user_sorted, self._user_order, raw_ids)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        histories = [np.asarray(h if h is not None else [], dtype=np.int64) for h in model_input["history"]]
        length = self.spec.max_length
        inputs = np.zeros((len(histories), length), dtype=np.int64)
        seen = np.full((len(histories), max([len(h) for h in histories] + [1])), -1, dtype=np.int64)
        for row, history in enumerate(histories):
            known = self.item_index(history)
            seen[row, : len(known)] = known
            known = known[known >= 0][-length:]
            inputs[row, length - len(known):] = known + 1
        users = np.full(len(histories), -1, dtype=np.int64)
        if "user_id" in model_input:
            users = self.user_index(model_input["user_id"].fillna(-1).to_numpy(dtype=np.int64))
        batch = EvalBatch(users=torch.from_numpy(users), inputs=torch.from_numpy(inputs),
                          behaviors=torch.zeros_like(torch.from_numpy(inputs)),
                          gaps=torch.zeros_like(torch.from_numpy(inputs)),
                          targets=torch.full((len(histories), 1), -1), seen=torch.from_numpy(seen))
        scores = self.score_batch(batch)
        uninformed = torch.from_numpy(self.uninformed(batch))
        if self.popularity is not None and bool(uninformed.any()):
            scores[uninformed] = torch.from_numpy(self.popularity)
        rows, cols = np.nonzero(seen >= 0)
        scores[rows, seen[rows, cols]] = float("-inf")  # never recommend what the user has
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        values, indices = top.values.numpy().astype(float), top.indices.numpy()
        shown = np.isfinite(values)  # fewer than k items left unseen: a shorter list
        return pd.DataFrame(
            {
                "item_ids": [self.item_ids[i[ok]].tolist() for i, ok in zip(indices, shown, strict=True)],
                "scores": [v[ok].tolist() for v, ok in zip(values, shown, strict=True)],
            }
        )


def _by_index(table: pa.Table, idx: str, raw: str, size: int) -> np.ndarray:
    ids = np.full(size, -1, dtype=np.int64)
    index = table.column(idx).to_numpy()
    keep = index < size
    ids[index[keep]] = table.column(raw).to_numpy()[keep]
    return ids


def _lookup(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, kind="stable")
    return ids[order], order


def _find(sorted_ids: np.ndarray, order: np.ndarray, raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.int64)
    if not len(sorted_ids):
        return np.full(len(raw), -1)
    position = np.clip(np.searchsorted(sorted_ids, raw), 0, len(sorted_ids) - 1)
    found = sorted_ids[position] == raw
    return np.where(found, order[position], -1)
