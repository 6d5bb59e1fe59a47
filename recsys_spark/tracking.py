"""MLflow: where runs are stored, what each run records, and champion/challenger gating.

Default store: a SQLite database and an artifact folder under the lakehouse root
(``<root>/mlflow``), so a laptop needs no server; ``mlflow.tracking_uri`` points anywhere else
on clusters. Every trained model is registered under one name; the newest version gets the alias
``challenger`` and becomes ``champion`` only if it beats the current champion on the gating
metric, measured on the same evaluation set; the decision and both numbers are tags of the
version. Models are loaded only through the registry (``models:/<name>@<alias>``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_spark.config import Settings
from recsys_spark.constants import metric_key
from recsys_spark.errors import RegistryError, TrackingUnavailableError
from recsys_spark.logs import get_logger, log_event
from recsys_spark.processes import environment

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = get_logger("tracking")

CHAMPION = "champion"
CHALLENGER = "challenger"
RUN_KEY_TAG = "recsys.run_key"  # a scheduler's idempotency key of a training run


def tracking_uri(settings: Settings) -> str:
    """``mlflow.tracking_uri``, or the lakehouse's own SQLite store (created by ``connect``)."""
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    return f"sqlite:///{_default_store(settings)}"


def _default_store(settings: Settings) -> Path:
    return Path(settings.root) / "mlflow" / "mlflow.db"


def is_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (HTTP API) rather than a store this process opens."""
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_location(settings: Settings) -> str | None:
    """Where new experiments keep artifacts; None lets a tracking server choose (with
    ``--serve-artifacts``: its own root, served over HTTP, so no client needs that folder)."""
    if settings.mlflow.artifact_location:
        return settings.mlflow.artifact_location
    if is_server(tracking_uri(settings)):
        return None
    return (Path(settings.root) / "mlflow" / "artifacts").as_uri()


def connect(settings: Settings) -> MlflowClient:
    """A client of the configured store, checked to answer (fails fast, before any work)."""
    from mlflow import MlflowClient

    if not settings.mlflow.tracking_uri:
        _default_store(settings).parent.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(settings)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # One quick attempt for the check: an unreachable server must fail in seconds, not after
    # minutes of retries. Later requests keep MLflow's retries (a busy server is no failure).
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    try:
        with environment(quick, keep_existing=True):
            client.search_experiments(max_results=1)
    except Exception as exc:  # any transport or store error means "unreachable" here
        raise TrackingUnavailableError(
            f"MLflow tracking store {uri} is unreachable (check mlflow.tracking_uri): {exc}") from exc
    return client


@contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``, ``start_run``, ``models:/`` downloads) works on the
    process's tracking and registry URIs: point them at ``uri`` for the block, then back at
    what they were (unset included, so no default store appears in the working directory)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry  # where MLflow keeps them
    from mlflow.tracking._tracking_service import utils as tracking

    previous: tuple[Any, Any] = (tracking._tracking_uri, registry._registry_uri)  # noqa: SLF001
    # setting them also exports them to the environment, for subprocesses: restored with it
    with environment({"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])


def experiment_id(client: MlflowClient, settings: Settings) -> str:
    found = client.get_experiment_by_name(settings.mlflow.experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(settings.mlflow.experiment, artifact_location=artifact_location(settings))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"training.sasrec.dim": "64", ...}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, default=str) if not isinstance(value, str) else value
    return flat


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # the store takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


def log_final_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], prefix: str) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(metric_key(f"{prefix}{k}"), float(v), now, 0) for k, v in metrics.items()])


def log_json(client: MlflowClient, run_id: str, name: str, payload: Any) -> None:
    client.log_text(run_id, json.dumps(payload, indent=2, default=str), name)


def load_json(client: MlflowClient, run_id: str, name: str) -> Any:
    """An artifact ``log_json`` wrote."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return json.loads(Path(client.download_artifacts(run_id, name, folder)).read_text())


def keyed_run(client: MlflowClient, settings: Settings, key: str, model: str) -> Any | None:
    """The newest run of ``model`` tagged with run key ``key``, or None."""
    if "'" in key or "\\" in key:
        raise RegistryError(f"a run key may not hold quotes or backslashes: {key!r}")
    found = client.get_experiment_by_name(settings.mlflow.experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}' and tags.`recsys.model` = '{model}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def log_learning_curves(client: MlflowClient, run_id: str, history: list[dict[str, float]], metric: str) -> None:
    """Training loss and the validation gating metric per epoch, as a PNG artifact."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker=".")
    left.set(title="training loss", xlabel="epoch")
    for name in (metric, "val_hit@10"):
        key = name if name.startswith("val_") else f"val_{name}"
        if key in history[0]:
            right.plot(epochs, [h[key] for h in history], marker=".", label=key)
    right.set(title="validation", xlabel="epoch")
    right.legend()
    figure.tight_layout()
    _log_figure(client, run_id, figure, "plots/learning_curves.png")


def log_metrics_at_k(client: MlflowClient, run_id: str, metrics: Mapping[str, float], ks: list[int]) -> None:
    """HIT/NDCG/Recall at each K on the test split, as a grouped bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    width = 0.8 / 3
    for i, name in enumerate(("hit", "ndcg", "recall")):
        values = [metrics.get(f"{name}@{k}", 0.0) for k in ks]
        axis.bar([j + i * width for j in range(len(ks))], values, width, label=name)
    axis.set_xticks([j + width for j in range(len(ks))], [f"@{k}" for k in ks])
    axis.set(title="test metrics at K")
    axis.legend()
    figure.tight_layout()
    _log_figure(client, run_id, figure, "plots/metrics_at_k.png")


def _log_figure(client: MlflowClient, run_id: str, figure: Any, name: str) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(name).name
        path.write_bytes(buffer.getvalue())
        client.log_artifact(run_id, str(path), str(Path(name).parent))


def alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    """The model version holding ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def registered_version(client: MlflowClient, name: str, version: str | None) -> Any:
    """Version ``version`` of registered model ``name`` (default: its newest)."""
    from mlflow.exceptions import MlflowException

    if version is not None:
        try:
            return client.get_model_version(name, version)
        except MlflowException as exc:
            raise RegistryError(f"registered model {name!r} has no version {version!r}") from exc
    try:
        found = list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        found = []
    if not found:
        raise RegistryError(f"registered model {name!r} has no versions: run `recsys train` first")
    return max(found, key=lambda v: int(v.version))


def record_gate(
    client: MlflowClient,
    settings: Settings,
    version: str,
    challenger_value: float,
    champion: Any | None,
    champion_value: float | None,
    eval_set: str,
    *,
    champion_error: str | None = None,
) -> bool:
    """Give ``version`` the challenger alias and promote it when it beats the champion.

    Returns whether it was promoted. The decision, both values and the evaluation set are tags
    of the version, so the registry itself explains every promotion.
    """
    name = settings.mlflow.registered_model
    metric = settings.evaluation.gate_metric
    client.set_registered_model_alias(name, CHALLENGER, version)
    if not math.isfinite(challenger_value):  # a diverged model must never become champion
        promoted, reason = False, f"{metric} {challenger_value} is not a finite number (the model diverged)"
    elif champion is None:
        promoted, reason = True, "no champion yet"
    elif champion_value is None:
        promoted, reason = True, f"champion could not be evaluated ({champion_error or 'no value'})"
    elif challenger_value > champion_value:
        promoted, reason = True, f"{metric} {challenger_value:.5f} > champion's {champion_value:.5f}"
    else:
        promoted, reason = False, f"{metric} {challenger_value:.5f} <= champion's {champion_value:.5f}"
    tags = {
        "gate.metric": metric,
        "gate.challenger_value": f"{challenger_value:.6f}",
        "gate.champion_value": "" if champion_value is None else f"{champion_value:.6f}",
        "gate.champion_version": "" if champion is None else str(champion.version),
        "gate.eval_set": eval_set,
        "gate.decision": "promoted" if promoted else "kept champion",
        "gate.reason": reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    log_event(log, "registry.gate", model=name, version=version, promoted=promoted, reason=reason)
    return promoted


def promote(client: MlflowClient, settings: Settings, version: str, *, reason: str) -> None:
    """Make ``version`` the champion by hand (``recsys promote``), recording why."""
    name = settings.mlflow.registered_model
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(f"model {name} has no version {version}") from exc
    previous = alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "gate.decision", "promoted by hand")
    client.set_model_version_tag(name, version, "gate.reason", reason)
    client.set_model_version_tag(
        name, version, "gate.previous_champion", "" if previous is None else str(previous.version)
    )
    log_event(log, "registry.promote", model=name, version=version, reason=reason)


def model_uri(settings: Settings, *, alias: str | None = None, version: str | None = None) -> str:
    """``models:/<name>@alias`` or ``models:/<name>/<version>``: the only way models load."""
    name = settings.mlflow.registered_model
    if version is not None:
        return f"models:/{name}/{version}"
    return f"models:/{name}@{alias or CHAMPION}"
