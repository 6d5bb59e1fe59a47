"""``recsys train``: gold table -> TorchDistributor DDP training -> MLflow run -> registry gate.

Order matters for "fail fast and leave the registry unchanged": the model name, the config and
the gold table are checked and the tracking store is reached *before* any run is created, and
the model is registered only after training and test evaluation succeeded.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pyspark.sql import functions as F

from recsys_spark.config import Settings
from recsys_spark.constants import (
    CATEGORY_ID,
    GOLD_ITEM_FEATURES,
    GOLD_TRAINING_EXAMPLES,
    HISTORY_ITEMS,
    ITEM_ID,
    ITEM_IDX,
    SILVER_ITEM_INDEX,
    SILVER_USER_INDEX,
    SPLIT,
    TEST,
    TRAIN,
    USER_ID,
    USER_IDX,
    metric_key,
)
from recsys_spark.errors import ConfigError, RecsysError, RegistryError, TrainingFailedError
from recsys_spark.evaluation.evaluate import evaluate_registered
from recsys_spark.logs import get_logger, log_event, log_event_at
from recsys_spark.modeling.gold import TrainingData, load_training_data
from recsys_spark.modeling.package import load_registered_model
from recsys_spark.modeling.tasks import TASKS, ModelSpec, get_task
from recsys_spark.processes import environment
from recsys_spark.spark import wait_for_slots, work_dir
from recsys_spark.storage import Lakehouse
from recsys_spark.tracking import (
    CHAMPION,
    RUN_KEY_TAG,
    alias_version,
    connect,
    experiment_id,
    flatten,
    fluent_store,
    keyed_run,
    load_json,
    log_final_metrics,
    log_json,
    log_learning_curves,
    log_metrics_at_k,
    log_params,
    model_uri,
    record_gate,
    registered_version,
    tracking_uri,
)
from recsys_spark.training.loop import BEST, TrainJob, TrainResult, train_worker

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from pyspark.sql import SparkSession

log = get_logger("train")


MODEL_ARTIFACT = "recommender"
REPORT_ARTIFACT = "report/train.json"  # the run's TrainingReport, returned again for its run key


@dataclass
class TrainingReport:
    run_id: str
    model_name: str
    model_version: str
    registered_model: str
    test: dict[str, float]
    validation: dict[str, float]
    best_epoch: int
    epochs_run: int
    promoted: bool
    champion_version: str | None
    champion_value: float | None
    gate_metric: str
    world_size: int
    seconds: float
    data: dict[str, Any]
    gated: bool = True
    run_key: str | None = None
    reused: bool = False  # a finished run of the same run key, returned as it was recorded

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result.update(self.test)  # hit@10 etc. at the top level, as the CLI contract says
        return result


def resolve_model(settings: Settings, model: str | None) -> str:
    name = model or settings.training.model
    if name not in TASKS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return name


def item_log_q(lake: Lakehouse, data: TrainingData) -> np.ndarray:
    """log of each item's share of training interactions (smoothed): the sampling probability
    that in-batch and sampled softmax correct for."""
    examples = lake.read(GOLD_TRAINING_EXAMPLES, version=data.version).filter(F.col(SPLIT) == TRAIN)
    counts = np.ones(data.num_items, dtype=np.float64)
    exploded = examples.select(F.explode(HISTORY_ITEMS).alias(ITEM_IDX)).groupBy(ITEM_IDX).count()
    for row in exploded.collect():  # one row per item: bounded by the catalogue, not the data
        counts[row[ITEM_IDX]] += row["count"]
    return np.log(counts / counts.sum()).astype(np.float32)


def item_categories(lake: Lakehouse, num_items: int) -> tuple[np.ndarray, int]:
    """(I + 1,) dense category 1..C of item id 1..I (0 = unknown), and C."""
    dense = np.zeros(num_items + 1, dtype=np.int64)
    if not lake.exists(GOLD_ITEM_FEATURES):
        return dense, 0
    rows = lake.read(GOLD_ITEM_FEATURES).select(ITEM_IDX, CATEGORY_ID).filter(
        F.col(ITEM_IDX) < num_items).toArrow()
    categories = rows.column(CATEGORY_ID).to_numpy(zero_copy_only=False)
    known = ~pd.isna(categories)
    codes, uniques = pd.factorize(categories[known])
    dense[rows.column(ITEM_IDX).to_numpy()[known] + 1] = codes + 1
    return dense, len(uniques)


def _dictionary(lake: Lakehouse, table: str, idx: str, raw: str, size: int) -> pa.Table:
    return lake.read(table).select(idx, raw).filter(F.col(idx) < size).toArrow()


def build_spec(lake: Lakehouse, settings: Settings, name: str, data: TrainingData) -> ModelSpec:
    hyper = getattr(settings.training, name).model_dump()
    categories, num_categories = (item_categories(lake, data.num_items) if name == "two_tower"
                                  else (None, 0))
    spec = ModelSpec(name=name, num_items=data.num_items, num_users=data.num_users,
                     max_length=settings.model_max_length, hyperparameters=hyper,
                     num_categories=num_categories, item_categories=categories,
                     log_q=item_log_q(lake, data))
    try:
        get_task(name).build(spec)  # a config that cannot build fails here, before any run
    except ValueError as exc:
        raise ConfigError(f"training.{name}: {exc}") from exc
    return spec


def run_training(
    spark: SparkSession,
    lake: Lakehouse,
    settings: Settings,
    *,
    model: str | None = None,
    resume_run_id: str | None = None,
    gate: bool = True,
    run_key: str | None = None,
) -> TrainingReport:
    """Train ``model`` on the gold table, log everything to MLflow, register and gate it.

    ``gate=False`` registers the challenger without the registry decision (``run_gate`` makes
    it later). ``run_key`` (a scheduler's "model of day D") makes a rerun idempotent: a finished
    run of the same key and model is returned as it was recorded, and an unfinished one that
    got as far as recording its data is resumed, so a key never registers a second model.

    Raises:
        ConfigError: unknown model, or hyperparameters that cannot build a model.
        TableNotFoundError / InputDataError: no gold table, or a split without rows.
        TrackingUnavailableError: the tracking store does not answer.
    """
    started = time.perf_counter()
    name = resolve_model(settings, model)
    client = connect(settings)
    if run_key is not None and resume_run_id is None:
        previous = keyed_run(client, settings, run_key, name)
        if previous is not None and previous.info.status == "FINISHED":
            recorded = load_json(client, previous.info.run_id, REPORT_ARTIFACT)
            log_event(log, "train.reused", run_id=previous.info.run_id, run_key=run_key)
            return TrainingReport(**recorded | {"reused": True})
        if previous is not None and "data.version" in previous.data.params:
            resume_run_id = previous.info.run_id
    # A resumed run continues on the data version it started with, under the same settings.
    pinned = None if resume_run_id is None else _resumable(client, settings, name, resume_run_id)
    data = load_training_data(lake, settings, version=pinned)
    spec = build_spec(lake, settings, name, data)
    if not _local_mode(spark, settings):  # before the run exists: a run that cannot start is no run
        _check_cluster_training(spark, settings)
    run_id = _open_run(client, settings, name, resume_run_id, run_key)
    try:
        report = _train_and_register(spark, lake, settings, client, run_id, spec, data,
                                     resume=resume_run_id is not None, gate=gate)
        report.seconds = round(time.perf_counter() - started, 1)
        report.run_key = run_key
        log_json(client, run_id, REPORT_ARTIFACT, asdict(report))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return report


# Settings a run may be resumed with a different value of: where and how fast it runs, not
# what it learns.
_RESUME_MAY_CHANGE = ("training.num_processes", "training.local_mode", "training.max_minutes",
                      "training.buffer_rows", "training.prefetch_batches", "training.model")


def _resumable(client: MlflowClient, settings: Settings, name: str, run_id: str) -> int:
    """Check that ``run_id`` can be resumed with ``settings``; return its data version.

    The run's parameters are what it is recorded to have trained with, so every setting that
    shapes the model (the model's own hyperparameters, the training schedule, the sequence
    length, the evaluation) must be what the run started with.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RecsysError(f"cannot resume: no run {run_id} in {tracking_uri(settings)}") from exc
    if run.data.tags.get("recsys.model") != name:
        raise ConfigError(f"run {run_id} trained {run.data.tags.get('recsys.model')!r}, not {name!r}")
    if run.info.status == "FINISHED":
        raise RecsysError(f"run {run_id} already finished; nothing to resume")
    logged = run.data.params
    if "data.version" not in logged:
        raise RecsysError(f"cannot resume: run {run_id} failed before it recorded its data; start a new run")
    other_models = tuple(f"training.{m}." for m in TASKS if m != name)
    current = flatten(settings.model_dump(mode="json"))
    changed = sorted(
        key for key, value in current.items()
        if (key.startswith(("training.", "evaluation.")) or key == "features.max_sequence_length")
        and not key.startswith(other_models) and key not in _RESUME_MAY_CHANGE
        and key in logged and logged[key] != value[:6000]
    )
    if changed:
        listed = ", ".join(f"{k}={logged[k]} (now {current[k]})" for k in changed[:5])
        raise ConfigError(f"run {run_id} was started with {listed}{' ...' if len(changed) > 5 else ''}: "
                          "resume it with the settings it started with, or start a new run")
    return int(logged["data.version"])


def _open_run(
    client: MlflowClient, settings: Settings, name: str, resume_run_id: str | None, run_key: str | None
) -> str:
    if resume_run_id is None:
        keyed = {} if run_key is None else {RUN_KEY_TAG: run_key}
        run = client.create_run(experiment_id(client, settings), run_name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={"recsys.kind": "model", "recsys.model": name, **keyed})
        return run.info.run_id
    client.update_run(resume_run_id, status="RUNNING")
    return resume_run_id


def checkpoint_dir(settings: Settings, run_id: str) -> Path:
    return Path(work_dir(settings)) / "checkpoints" / run_id


def distribute(spark: SparkSession, settings: Settings, job: TrainJob) -> TrainResult:
    """Run ``train_worker`` on ``num_processes`` DDP ranks under TorchDistributor."""
    from recsys_spark.training.distributor import BoundTorchDistributor

    t = settings.training
    local = _local_mode(spark, settings)
    scratch = Path(work_dir(settings)) / "torchrun"
    scratch.mkdir(parents=True, exist_ok=True)
    distributor = BoundTorchDistributor(num_processes=t.num_processes, local_mode=local,
                                        use_gpu=torch.cuda.is_available())
    # torchrun leaves folders in TMPDIR: keep them ours (tempfile caches the folder it chose)
    tempfile.tempdir = None
    try:
        # Rank output is written to our stdout, which belongs to the --json result line.
        with environment({"TMPDIR": str(scratch)}), contextlib.redirect_stdout(sys.stderr):
            result: TrainResult = distributor.run(train_worker, job)
            return result
    except RuntimeError as exc:
        raise TrainingFailedError(f"training failed on a rank ({exc}); the ranks' output is above") from exc
    finally:
        tempfile.tempdir = None


def _local_mode(spark: SparkSession, settings: Settings) -> bool:
    """Ranks on the driver (TorchDistributor's local mode) or as barrier tasks on executors."""
    chosen = settings.training.local_mode
    return chosen if chosen is not None else str(spark.sparkContext.master).startswith("local")


def _check_cluster_training(spark: SparkSession, settings: Settings) -> None:
    """Ranks on executors: checkpoints on storage the driver shares, and a task slot per rank.

    Rank 0 writes the checkpoints (and the best model the driver then registers) under
    ``checkpoint_dir``; the driver reads them, so it must be shared storage, not a folder
    of the executor's host.
    """
    root = Path(settings.root)
    if "://" in settings.root or not checkpoint_dir(settings, "run").is_relative_to(root):
        raise ConfigError(
            f"training.local_mode=false keeps checkpoints under the lakehouse root, which must then be a "
            f"folder the driver and every executor share (a mounted file system); root {settings.root} "
            "is not one: set root to a shared mount, or training.local_mode=true"
        )
    wait_for_slots(spark, settings.training.num_processes, settings.spark.executor_wait_seconds,
                   need=f"training.num_processes={settings.training.num_processes} (one barrier task per rank)")


def _train_and_register(
    spark: SparkSession,
    lake: Lakehouse,
    settings: Settings,
    client: MlflowClient,
    run_id: str,
    spec: ModelSpec,
    data: TrainingData,
    *,
    resume: bool,
    gate: bool = True,
) -> TrainingReport:
    data_record = data.record()
    if not resume:
        log_params(client, run_id, flatten(settings.model_dump(mode="json")) | flatten(
            {"data": {k: v for k, v in data_record.items() if k != "rows"} | {"rows": data.rows}}))
        log_json(client, run_id, "config/resolved.json", settings.model_dump(mode="json"))
        log_json(client, run_id, "data/versions.json", data_record)
    job = TrainJob.from_settings(settings, spec, data, checkpoint_dir=str(checkpoint_dir(settings, run_id)),
                                 resume=resume, tracking_uri=tracking_uri(settings), run_id=run_id)
    log_event(log, "train.start", run_id=run_id, model=spec.name, processes=settings.training.num_processes,
              rows=data.rows, items=data.num_items, resume=resume)
    result = distribute(spark, settings, job)
    log_final_metrics(client, run_id, result.test, "test_")
    log_final_metrics(client, run_id, result.validation, "best_val_")
    log_learning_curves(client, run_id, result.history, job.stop_metric)
    log_metrics_at_k(client, run_id, result.test, settings.evaluation.ks)

    # A resumed run that had registered its model before failing (in the gate) registers no twin.
    version = (_registered_version(client, settings, run_id) if resume else None) or _log_models(
        lake, settings, client, run_id, spec, data, Path(result.best_state_path))
    promoted, champion, champion_value = (
        _gate(client, settings, data, run_id, version, result.test[settings.evaluation.gate_metric],
              Path(result.best_state_path)) if gate else (False, None, None))
    client.set_tag(run_id, "recsys.model_version", version)
    if gate:
        client.set_tag(run_id, "recsys.promoted", str(promoted).lower())
    log_event(log, "train.done", run_id=run_id, version=version, promoted=promoted, gated=gate,
              **{f"test_{k}": round(v, 5) for k, v in result.test.items() if k in ("ndcg@10", "hit@10")})
    return TrainingReport(
        run_id=run_id, model_name=spec.name, model_version=version,
        registered_model=settings.mlflow.registered_model, test=result.test,
        validation=result.validation, best_epoch=result.best_epoch, epochs_run=result.epochs_run,
        promoted=promoted, champion_version=None if champion is None else str(champion.version),
        champion_value=champion_value, gate_metric=settings.evaluation.gate_metric,
        world_size=result.world_size, seconds=0.0, data=data_record, gated=gate,
    )


def _gate(
    client: MlflowClient, settings: Settings, data: TrainingData, run_id: str, version: str,
    challenger_value: float, best_state: Path,
) -> tuple[bool, Any, float | None]:
    """Evaluate the champion on the same test rows and let ``record_gate`` decide between it and
    the challenger (its test value, its best weights); returns (promoted, the champion before,
    its value)."""
    name, gate = settings.mlflow.registered_model, settings.evaluation.gate_metric
    champion = alias_version(client, name, CHAMPION)
    recorded = client.get_model_version(name, version).tags
    if "gate.decision" in recorded:  # a resumed run whose model was gated before the run died
        value = recorded.get("gate.champion_value")
        promoted = champion is not None and str(champion.version) == version
        return promoted, champion, float(value) if value else None
    champion_value = champion_error = None
    if champion is not None:
        try:
            loaded = load_registered_model(model_uri(settings, version=champion.version), tracking_uri(settings))
        except Exception as exc:  # noqa: BLE001 - a champion that cannot be loaded serves nobody either
            champion_error = f"{type(exc).__name__}: {exc}"[:500]
            log_event_at(log, logging.WARNING, "train.champion_unusable", version=str(champion.version),
                      error=champion_error)
        else:  # an evaluation that fails is a failed run, never a free promotion
            champion_value = evaluate_registered(
                loaded, data.slice(TEST), num_items=data.num_items, ks=settings.evaluation.ks,
                mask_seen=data.mask_seen, batch_size=settings.evaluation.batch_size)[gate]
    if not _finite_weights(best_state):
        # Metrics treat NaN scores as the worst rank, so a diverged model still has finite ones.
        challenger_value = float("nan")
        log_event_at(log, logging.WARNING, "train.diverged", run_id=run_id, version=version)
    eval_set = f"{GOLD_TRAINING_EXAMPLES}@v{data.version}/{TEST}"
    promoted = record_gate(client, settings, version, challenger_value, champion, champion_value, eval_set,
                           champion_error=champion_error)
    return promoted, champion, champion_value


def run_gate(lake: Lakehouse, settings: Settings, *, version: str | None = None) -> dict[str, Any]:
    """The registry decision for a registered ``version`` (default: the newest), as
    ``recsys train`` makes it, for challengers registered with ``gate=False``.

    The challenger's test value is the one its run logged; the champion is evaluated on the
    same test rows (the gold version the challenger trained on). A version already decided
    keeps its decision, so a rerun changes nothing.

    Raises:
        RegistryError: no such version, or its run lacks what the gate needs.
    """
    client = connect(settings)
    found = registered_version(client, settings.mlflow.registered_model, version)
    version, run_id = str(found.version), found.run_id
    if "gate.decision" not in found.tags:  # decided once: a rerun reports the recorded decision
        run = client.get_run(run_id)
        metric = settings.evaluation.gate_metric
        value = run.data.metrics.get(metric_key(f"test_{metric}"))
        best_state = checkpoint_dir(settings, run_id) / BEST
        if value is None or "data.version" not in run.data.params:
            raise RegistryError(f"run {run_id} of version {version} recorded no test {metric} or no data version")
        if not best_state.is_file():
            raise RegistryError(f"the checkpoint of run {run_id} ({best_state}) is gone: cannot check the weights")
        data = load_training_data(lake, settings, version=int(run.data.params["data.version"]))
        promoted, _, _ = _gate(client, settings, data, run_id, version, value, best_state)
        client.set_tag(run_id, "recsys.promoted", str(promoted).lower())
    tags = client.get_model_version(settings.mlflow.registered_model, version).tags
    champion = alias_version(client, settings.mlflow.registered_model, CHAMPION)
    return {  # the decision as recorded in the registry, identical on a rerun
        "registered_model": settings.mlflow.registered_model, "model_version": version, "run_id": run_id,
        "promoted": tags.get("gate.decision") == "promoted", "decision": tags.get("gate.decision"),
        "reason": tags.get("gate.reason"),
        "gate_metric": tags.get("gate.metric"), "challenger_value": tags.get("gate.challenger_value"),
        "compared_with": tags.get("gate.champion_version") or None,
        "champion_value": tags.get("gate.champion_value") or None,
        "champion_version": None if champion is None else str(champion.version),
    }


def _finite_weights(state_path: Path) -> bool:
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def _registered_version(client: MlflowClient, settings: Settings, run_id: str) -> str | None:
    found = client.search_model_versions(f"name = '{settings.mlflow.registered_model}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in found)) if found else None


def _pyfunc_signature() -> Any:
    """Raw item ids in, top-k raw ids and scores out; ``user_id`` is optional (only mf uses it)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(Array("long"), "history"), ColSpec("long", "user_id", required=False)]),
        outputs=Schema([ColSpec(Array("long"), "item_ids"), ColSpec(Array("double"), "scores")]),
        params=ParamSchema([ParamSpec("k", "long", 10)]),
    )


def _log_models(
    lake: Lakehouse,
    settings: Settings,
    client: MlflowClient,
    run_id: str,
    spec: ModelSpec,
    data: TrainingData,
    best_state: Path,
) -> str:
    """Log and register the pyfunc, with the digests of its files; return the new version."""
    import mlflow

    from recsys_spark.modeling.package import (
        DIGESTS_TAG,
        PIP_REQUIREMENTS,
        PYFUNC_CODE,
        artifact_digests,
        write_artifacts,
    )

    state = torch.load(best_state, map_location="cpu", weights_only=True)
    items = _dictionary(lake, SILVER_ITEM_INDEX, ITEM_IDX, ITEM_ID, data.num_items)
    users = _dictionary(lake, SILVER_USER_INDEX, USER_IDX, USER_ID, data.num_users) if spec.name == "mf" else None
    with (fluent_store(tracking_uri(settings)), tempfile.TemporaryDirectory(dir=work_dir(settings)) as folder,
          mlflow.start_run(run_id=run_id)):
        artifacts = write_artifacts(Path(folder), spec, state, items, users)
        digests = artifact_digests(artifacts)
        # A real file even when the package is imported from a zip (spark-submit --py-files).
        code = Path(folder) / PYFUNC_CODE.name
        code.write_bytes(resources.files("recsys_spark.modeling").joinpath(PYFUNC_CODE.name).read_bytes())
        raw_items = items.column(ITEM_ID).to_pylist()[:3]
        example = pd.DataFrame({"history": [raw_items], "user_id": [0]})
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(code), artifacts=artifacts,
            signature=_pyfunc_signature(), input_example=example,
            pip_requirements=PIP_REQUIREMENTS, registered_model_name=settings.mlflow.registered_model,
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(settings.mlflow.registered_model, version, DIGESTS_TAG, digests)
    client.set_model_version_tag(settings.mlflow.registered_model, version, "recsys.model", spec.name)
    return version
