"""How a trained model is packaged in MLflow, and loaded back — only through the registry.

Each run logs one model, ``recommender``: an ``mlflow.pyfunc`` model that takes raw item ids and
returns raw item ids: ``predict(pd.DataFrame({"history": [[raw ids, oldest first]], "user_id":
[...]}), params={"k": 10})`` -> columns ``item_ids`` and ``scores`` (a history of only unknown
items, where the network has nothing to go on, is ranked by training popularity, the share of
training interactions being its score). It is the registered model (the champion/challenger
aliases point at its versions); scoring and evaluation load it.

Nothing in it is a pickle. The pyfunc is logged as code (MLflow's "models from code":
``pyfunc_code.py`` builds a ``RecommenderModel``), the weights are the state dict's arrays in a
NumPy ``.npz`` read with ``allow_pickle=False``, the architecture is JSON, the id dictionaries
are Parquet. At registration the SHA-256 of each of those files is recorded as the version's
tag ``recsys.artifact_sha256``; ``load_registered_model`` — the platform's only way to load a
model — checks them before it reads anything, and builds the model from the installed package,
never running code from the store. The network itself is ``RecommenderModel.model`` (a plain
``nn.Module``; ``score_batch`` maps an ``EvalBatch`` to (B, I) scores).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.pyfunc import PythonModel

from recsys_spark.errors import ModelIntegrityError
from recsys_spark.modeling.batches import EvalBatch
from recsys_spark.modeling.tasks import ModelSpec, get_task

if TYPE_CHECKING:
    from mlflow.pyfunc import PythonModelContext

ARCHITECTURE = "architecture"
WEIGHTS = "weights"
ITEMS = "items"
USERS = "users"
ARTIFACT_FILES = {ARCHITECTURE: "architecture.json", WEIGHTS: "weights.npz", ITEMS: "items.parquet",
                  USERS: "users.parquet"}
DIGESTS_TAG = "recsys.artifact_sha256"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_code.py")
POPULARITY = "train_share"
PIP_REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    "mlflow==3.17.2",
    "pandas",
    "pyarrow",
    "numpy",
    "recsys-spark",
]


def write_artifacts(folder: Path, spec: ModelSpec, state: dict[str, torch.Tensor], items: pa.Table,
                    users: pa.Table | None) -> dict[str, str]:
    """Files of the pyfunc model; returns the ``artifacts`` mapping for ``log_model``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / name for key, name in ARTIFACT_FILES.items()}
    paths[ARCHITECTURE].write_text(json.dumps(spec.architecture(), indent=2))
    arrays: dict[str, Any] = {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}
    np.savez(paths[WEIGHTS], **arrays)
    if spec.log_q is not None:  # each item's share of the training interactions
        items = items.append_column(POPULARITY, pa.array(np.exp(spec.log_q)[items.column("item_idx").to_numpy()]))
    pq.write_table(items, paths[ITEMS])
    if users is not None:
        pq.write_table(users, paths[USERS])
    else:
        del paths[USERS]
    return {key: str(path) for key, path in paths.items()}


def artifact_digests(artifacts: Mapping[str, str]) -> str:
    """The value of the ``recsys.artifact_sha256`` tag: file name -> SHA-256 of its bytes."""
    return json.dumps({Path(path).name: _sha256(Path(path)) for path in artifacts.values()}, sort_keys=True)


def load_registered_model(model_uri: str, tracking_uri: str) -> RecommenderModel:
    """The ``RecommenderModel`` of a registry URI (``models:/name@alias`` or ``models:/name/N``),
    its files checked against the digests recorded at registration.

    Raises:
        ModelIntegrityError: a file is missing or differs from what was registered, or the
            version has no digests (then nothing of it was read).
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name, version = _registry_version(client, model_uri)
    recorded = client.get_model_version(name, version).tags.get(DIGESTS_TAG)
    if recorded is None:
        raise ModelIntegrityError(
            f"registered model {name!r} v{version} has no {DIGESTS_TAG} tag (not registered by this "
            "version of recsys-spark): refusing to load it; train a new version"
        )
    expected: dict[str, str] = json.loads(recorded)
    with tempfile.TemporaryDirectory(prefix="recsys-model-") as folder:
        # The version's own files, not models:/NAME/V: MLflow resolves a models:/ URI through the
        # process-wide registry URI whatever registry_uri is passed (a fresh process got "not found").
        source = client.get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=folder,
                                                         tracking_uri=tracking_uri))
        paths = {}
        for key, file_name in ARTIFACT_FILES.items():
            if file_name not in expected:
                continue
            path = local / "artifacts" / file_name
            if not path.is_file() or _sha256(path) != expected[file_name]:
                state = "is missing" if not path.is_file() else "differs from the file registered"
                raise ModelIntegrityError(
                    f"registered model {name!r} v{version} refused: its artifact {file_name} {state} "
                    f"(digest in the version tag {DIGESTS_TAG}); the tracking store was changed"
                )
            paths[key] = str(path)
        if ARCHITECTURE not in paths or WEIGHTS not in paths or ITEMS not in paths:
            raise ModelIntegrityError(f"registered model {name!r} v{version} lacks recsys artifacts")
        return RecommenderModel.from_artifacts(paths)


_LOADED: dict[tuple[str, str], RecommenderModel] = {}


def cached_registered_model(model_uri: str, tracking_uri: str) -> RecommenderModel:
    """``load_registered_model``, once per process and store: Spark's Python workers outlive
    jobs, so each loads a version once for every partition and job it scores. Give a version's
    URI (``models:/name/N``), not an alias, which may move while a worker holds the model."""
    key = (tracking_uri, model_uri)
    if key not in _LOADED:
        _LOADED[key] = load_registered_model(model_uri, tracking_uri)
    return _LOADED[key]


def _registry_version(client: Any, model_uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))", model_uri)
    if match is None:
        raise ValueError(f"not a registry URI (models:/name@alias or models:/name/N): {model_uri!r}")
    if match["alias"]:
        return match["name"], str(client.get_model_version_by_alias(match["name"], match["alias"]).version)
    return match["name"], match["version"]


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class RecommenderModel(PythonModel):
    """The registered pyfunc: raw ids in, ranked raw ids out (see module docstring)."""

    def load_context(self, context: PythonModelContext) -> None:
        self._load(context.artifacts)

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, str]) -> RecommenderModel:
        """The model from its files (keys of ``ARTIFACT_FILES``), as MLflow would load it."""
        model = cls()
        model._load(artifacts)
        return model

    def _load(self, artifacts: Mapping[str, str]) -> None:
        architecture = json.loads(Path(artifacts[ARCHITECTURE]).read_text())
        self.spec = ModelSpec(**architecture)
        self.task = get_task(self.spec.name)
        self.model = self.task.build(self.spec)
        with np.load(artifacts[WEIGHTS], allow_pickle=False) as weights:
            self.model.load_state_dict({name: torch.from_numpy(weights[name]) for name in weights.files})
        self.model.eval()
        items = pq.read_table(artifacts[ITEMS])
        self.item_ids = _by_index(items, "item_idx", "item_id", self.spec.num_items)
        self.popularity = None  # versions registered before it was packaged have none
        if POPULARITY in items.column_names:
            self.popularity = np.zeros(self.spec.num_items, dtype=np.float32)
            index = items.column("item_idx").to_numpy()
            keep = index < self.spec.num_items
            self.popularity[index[keep]] = items.column(POPULARITY).to_numpy()[keep]
        self._item_sorted, self._item_order = _lookup(self.item_ids)
        self.user_ids = None
        if USERS in artifacts:
            users = pq.read_table(artifacts[USERS])
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
