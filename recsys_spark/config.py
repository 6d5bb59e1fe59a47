"""The one typed configuration object, loaded from YAML with environment and CLI overrides.

Precedence, lowest first: defaults in this module < the YAML file < ``RECSYS__A__B=value``
environment variables < ``--set a.b=value`` < ``--root DIR``. Unknown keys and wrong types fail
at start with a message naming the key, before any Spark work begins.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recsys_spark.constants import ModelName, metric_names
from recsys_spark.errors import ConfigError

ENV_PREFIX = "RECSYS__"
CONFIG_ENV = "RECSYS_CONFIG"
DEFAULT_CONFIG = Path("conf/local.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _null_mappings_are_empty(cls, data: Any) -> Any:
        # A section (or spark.conf) whose every line is commented out is YAML null: empty.
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or not _is_mapping(cls, k)}


def _is_mapping(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    if field is None:
        return False
    annotation = field.annotation
    return (isinstance(annotation, type) and issubclass(annotation, BaseModel)) or (
        get_origin(annotation) or annotation
    ) is dict


def _as_utc(value: datetime | None) -> datetime | None:
    """Naive datetimes in config mean UTC: the lakehouse stores every timestamp in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class SparkSettings(_Section):
    master: str | None = Field(
        "local[*]", description="Spark master URL when recsys starts Spark itself; under spark-submit "
        "its --master wins. null: pyspark's default."
    )
    app_name: str = Field("recsys-spark", description="Spark application name.")
    driver_memory: str | None = Field(
        "2560m", pattern=r"(?i)^[0-9]+[kmgt]?b?$", description=(
            "JVM heap of the local driver (ignored when spark-submit sets it). The process's "
            "resident memory is this plus ~0.5 GB of metaspace, code and GC structures.")
    )
    shuffle_partitions: int = Field(8, gt=0, description="spark.sql.shuffle.partitions.")
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = Field(
        "WARN", description="Log level of Spark's JVM logs."
    )
    conf: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Any further Spark properties, passed through as-is."
    )
    executor_wait_seconds: float = Field(
        120.0, gt=0, description=(
            "Cluster masters: how long a new session waits for its first executor, and training for "
            "the task slots of its ranks, before failing with the reason (instead of hanging)."),
    )
    jars_dir: str | None = Field(
        ".jars/spark",
        description="Folder of Delta's and the Kafka connector's jars (`make setup` fetches them); "
        "a session whose storage.engine is delta-spark, or whose stream reads Kafka, puts them on "
        "its classpath. Relative to the working directory; null: the classpath is left as it is.",
    )


class StorageSettings(_Section):
    engine: Literal["auto", "delta-spark", "delta-rs"] = Field(
        "auto",
        description="delta-spark when Delta's jars are on Spark's classpath, delta-rs otherwise; "
        "auto detects.",
    )
    vacuum_retention_hours: float = Field(
        168.0, ge=0, description="Files no longer referenced are deleted after this long."
    )


class IngestSettings(_Section):
    min_event_time: datetime = Field(
        datetime(2000, 1, 1, tzinfo=UTC), description="Earlier event times are quarantined."
    )
    max_future_seconds: int = Field(
        86_400, ge=0, description="Event times this far past the ingest run are quarantined."
    )
    sequence_base_time: datetime = Field(
        datetime(2020, 1, 1, tzinfo=UTC),
        description="Time given to the first item of each line of a `sequences` file.",
    )
    sequence_step_seconds: int = Field(
        3600, gt=0, description="Time between consecutive items of a `sequences` line."
    )
    max_line_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="Longer lines are quarantined as line_too_long, their first bytes kept; "
        "local input files are never read into memory past this.",
    )

    _utc = field_validator("min_event_time", "sequence_base_time")(_as_utc)


class SplitSettings(_Section):
    protocol: Literal["auto", "leave-one-out", "temporal"] = Field(
        "auto",
        description="auto: leave-one-out for `sequences` input, temporal for event logs.",
    )
    validation_start: datetime | None = Field(
        None, description="Temporal split: start of the validation window (default: by fraction)."
    )
    test_start: datetime | None = Field(
        None, description="Temporal split: start of the test window (default: by fraction)."
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Temporal split: share of the time span used for validation."
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Temporal split: share of the time span used for test."
    )

    _utc = field_validator("validation_start", "test_start")(_as_utc)

    @model_validator(mode="after")
    def _windows_fit(self) -> SplitSettings:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must be below 1")
        if (
            self.validation_start is not None
            and self.test_start is not None
            and self.validation_start >= self.test_start
        ):
            raise ValueError("validation_start must be before test_start")
        return self


class FeatureSettings(_Section):
    as_of: datetime | None = Field(
        None, description="Features use only events at or before this time (default: the newest)."
    )
    windows_days: list[int] = Field(
        default_factory=lambda: [1, 7, 30], description="Look-back windows for counts, in days."
    )
    max_sequence_length: int = Field(
        50, gt=0, description="Most recent items kept per user sequence (model input length)."
    )
    top_categories: int = Field(3, gt=0, description="Categories listed per user.")
    collapse_repeats: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Keep one of consecutive events on the same item in sequences (a run of "
        "page views of one item is one step); auto: for event logs, not for `sequences` input "
        "(benchmark files are used exactly as published).",
    )
    split: SplitSettings = Field(default_factory=SplitSettings)

    _utc = field_validator("as_of")(_as_utc)

    @field_validator("windows_days")
    @classmethod
    def _positive_windows(cls, value: list[int]) -> list[int]:
        if not value or any(w <= 0 for w in value):
            raise ValueError("windows must be a non-empty list of positive day counts")
        return sorted(set(value))


class SASRecSettings(_Section):
    dim: int = Field(64, gt=0, description="Embedding and hidden size.")
    heads: int = Field(2, gt=0, description="Attention heads (dim must divide by it).")
    blocks: int = Field(2, gt=0, description="Transformer blocks.")
    ffn_dim: int = Field(128, gt=0, description="Feed-forward width.")
    dropout: float = Field(0.5, ge=0, lt=1, description="High: sparse e-commerce data overfits fast.")
    use_behaviors: bool = Field(False, description="Add behaviour-type embeddings.")
    use_gaps: bool = Field(False, description="Add log-bucketed time-gap embeddings.")
    lowpass_mix: float = Field(0.5, ge=0, le=1, description=(
        "Share of each block's token mixing done by a causal low-pass filter instead of attention "
        "(BSARec's inductive bias; 0 = plain SASRec)."))

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> SASRecSettings:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class TwoTowerSettings(_Section):
    dim: int = Field(64, gt=0)
    hidden: int = Field(128, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(0.05, gt=0, description="Softmax temperature of cosine scores.")


class MFSettings(_Section):
    dim: int = Field(64, gt=0)


class TrainingSettings(_Section):
    model: ModelName = Field("sasrec", description="Default model.")
    num_processes: int = Field(
        1, gt=0, description="TorchDistributor processes (DDP ranks): one per GPU or per few cores."
    )
    local_mode: bool | None = Field(
        None, description="Run ranks on the driver (default: when spark.master is local)."
    )
    epochs: int = Field(200, gt=0, description="Upper bound; early stopping usually ends first.")
    patience: int = Field(
        10, gt=0, description="Stop after this many evaluations without a better validation metric."
    )
    stop_metric: str | None = Field(
        None, description="Validation metric early stopping and the learning-rate decay follow "
        "(null: evaluation.gate_metric, the metric the model is judged by)."
    )
    max_minutes: float | None = Field(
        None, gt=0, description="Time budget: no new epoch starts after this (the best epoch is kept)."
    )
    batch_size: int = Field(128, gt=0, description="Global batch size, split across ranks.")
    learning_rate: float = Field(2e-3, gt=0)
    lr_decay: float = Field(
        0.3, gt=0, le=1, description="Multiply the learning rate by this after lr_decay_patience "
        "evaluations without a better validation metric (1.0: constant rate)."
    )
    lr_decay_patience: int = Field(3, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay.")
    grad_clip: float = Field(5.0, gt=0, description="Max gradient norm.")
    loss: Literal["full_softmax", "sampled_softmax"] = Field(
        "full_softmax", description="sampled_softmax (with log-Q correction) for big catalogues."
    )
    num_negatives: int = Field(256, gt=0, description="Negatives per batch for sampled_softmax.")
    max_length: int | None = Field(
        None, gt=0, description="Model sequence length (default: features.max_sequence_length)."
    )
    seed: int = 42
    buffer_rows: int = Field(8192, gt=0, description="Shuffle buffer of the streaming loader.")
    prefetch_batches: int = Field(4, ge=0, description="Batches read ahead on a thread.")
    sasrec: SASRecSettings = Field(default_factory=SASRecSettings)
    two_tower: TwoTowerSettings = Field(default_factory=TwoTowerSettings)
    mf: MFSettings = Field(default_factory=MFSettings)


class EvaluationSettings(_Section):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], description="Cut-offs K.")
    mask_history: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Exclude items the user already interacted with from the ranking; auto: "
        "for leave-one-out (the published protocol), not for temporal (repeats are real).",
    )
    gate_metric: str = Field("ndcg@10", description="Metric a challenger must beat to be champion.")
    batch_size: int = Field(256, gt=0, description="Rows scored at once.")

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        if not value or any(k <= 0 for k in value):
            raise ValueError("ks must be a non-empty list of positive cut-offs")
        return sorted(set(value))

    @model_validator(mode="after")
    def _gate_is_a_metric(self) -> EvaluationSettings:
        check_metric("gate_metric", self.gate_metric, self.ks)
        return self


class MlflowSettings(_Section):
    tracking_uri: str | None = Field(
        None, description="Default: a SQLite store at <root>/mlflow/mlflow.db. On clusters: the "
        "tracking server's http(s) URL, so executors reach runs, registry and artifacts over HTTP."
    )
    artifact_location: str | None = Field(
        None, description="Default: <root>/mlflow/artifacts, or with a tracking server the server's "
        "own artifact root (new experiments only)."
    )
    experiment: str = Field("recsys", description="Experiment every model and baseline logs to.")
    registered_model: str = Field(
        "recsys-recommender", description="Registry name; versions carry champion/challenger."
    )


# Options of Spark's Kafka source that serving.stream.kafka sets from its own keys, and consumer
# settings the source manages itself and refuses (its integration guide); lower case: Spark
# reads source options case-insensitively.
_KAFKA_OPTIONS_NOT_PASSED = (
    "subscribe", "subscribepattern", "assign", "startingoffsets", "maxoffsetspertrigger", "failondataloss",
    "kafka.bootstrap.servers", "kafka.auto.offset.reset", "kafka.enable.auto.commit", "kafka.key.deserializer",
    "kafka.value.deserializer", "kafka.interceptor.classes",
)


class KafkaSourceSettings(_Section):
    bootstrap_servers: str | None = Field(
        None, description="host:port[,host:port...] of the Kafka cluster; null: the local broker of "
        "`make kafka-up` (127.0.0.1:<broker.port>)."
    )
    topic: str = Field(
        "recsys-events", pattern=r"^[A-Za-z0-9._-]{1,249}$",
        description="Topic the events are read from, one event (a JSON line, or a Taobao CSV line) per message.",
    )
    starting_offsets: str = Field(
        "earliest", description="Where a query on a new checkpoint starts: earliest, latest, or JSON "
        "offsets per partition (Spark's startingOffsets). A restarted query resumes from its checkpoint.",
    )
    max_offsets_per_trigger: int | None = Field(
        None, gt=0, description="Most messages per micro-batch, split across partitions (null: all available)."
    )
    fail_on_data_loss: bool = Field(
        True, description="Stop the query when messages it has not read yet are gone (the topic was "
        "deleted or recreated, or retention removed them); false skips them with a warning in the log.",
    )
    options: dict[str, str] = Field(
        default_factory=dict, description="Further options of Spark's Kafka source, passed as they are: Kafka "
        "consumer settings as kafka.<name> (security: kafka.security.protocol, kafka.sasl.mechanism, "
        "kafka.sasl.jaas.config, kafka.ssl.truststore.location, ...), or the source's own (minPartitions, "
        "fetchOffset.numRetries, groupIdPrefix, ...).",
    )

    @field_validator("options")
    @classmethod
    def _passed_options(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.lower() in _KAFKA_OPTIONS_NOT_PASSED:
                raise ValueError(f"{key!r} is set by its own key of serving.stream.kafka, or managed by Spark's "
                                 "Kafka source")
        return value


class StreamSettings(_Section):
    source: Literal["files", "kafka"] = Field(
        "files", description="files: a landing folder; kafka: a Kafka topic (serving.stream.kafka; the "
        "session puts the connector's jars of spark.jars_dir on its classpath)."
    )
    landing: str | None = Field(None, description="Landing folder of event files (default <root>/_landing).")
    format: Literal["taobao", "jsonl"] = Field("jsonl", description="Format of the landed events.")
    checkpoint: str | None = Field(
        None, description="Streaming checkpoint (default <root>/_checkpoints/nearline)."
    )
    trigger_seconds: float = Field(1.0, gt=0, description="Micro-batch interval.")
    max_files_per_trigger: int = Field(100, gt=0, description="Landing files read per micro-batch.")
    app_id: str = Field(
        "recsys-nearline", description="Delta application id recording committed micro-batches."
    )
    kafka: KafkaSourceSettings = Field(default_factory=KafkaSourceSettings)


class ServingSettings(_Section):
    k: int = Field(50, gt=0, description="Items written per user.")
    exclude_bought: bool = Field(True, description="Never recommend what the user already bought.")
    category_allow: list[int] | None = Field(None, description="Only these categories (null: all).")
    category_deny: list[int] = Field(default_factory=list, description="Never these categories.")
    diversity_lambda: float = Field(
        0.0, ge=0, le=1, description="MMR trade-off: 0 pure relevance, 1 pure diversity."
    )
    diversity_by: Literal["category", "embedding"] = Field(
        "category", description="Similarity used by MMR: same category, or item-embedding cosine."
    )
    candidates: int = Field(200, gt=0, description="Top candidates re-ranked by the rules.")
    lookup_refresh_seconds: float = Field(
        1.0, gt=0, description="How often the lookup cache checks for a new table version."
    )
    stream: StreamSettings = Field(default_factory=StreamSettings)


class BrokerSettings(_Section):
    """The local single-node Kafka broker of `recsys broker up` / `make kafka-up`, for trials and tests."""

    port: int = Field(9092, ge=1, le=65535, description="Client port of the local Kafka broker (127.0.0.1 only).")
    controller_port: int = Field(
        9093, ge=1, le=65535, description="Port of the local broker's KRaft controller (127.0.0.1 only)."
    )
    folder: str = Field(
        ".kafka", description="Configuration, data, logs and pid file of the local broker; relative to the "
        "working directory. Its data outlives `recsys broker down`: delete the folder to start empty.",
    )
    jars_dir: str = Field(
        ".jars/kafka", description="Apache Kafka's jars (`make setup` fetches them); relative to the working directory."
    )
    heap: str = Field("512m", pattern=r"(?i)^[0-9]+[kmg]$", description="JVM heap of the local broker.")
    start_timeout_seconds: float = Field(
        120.0, gt=0, description="`recsys broker up` fails if the broker does not answer within this long."
    )

    @model_validator(mode="after")
    def _two_ports(self) -> BrokerSettings:
        if self.port == self.controller_port:
            raise ValueError(f"port and controller_port must differ (both {self.port})")
        return self


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = Field(
        "text", description="text: key=value lines for people; json: one object per line."
    )


class Settings(_Section):
    root: str = Field(
        "lakehouse",
        description="Lakehouse root: <root>/<layer>/<table>; a local folder or a URI on clusters.",
        validate_default=True,  # the default is relative too, and must be resolved like others
    )
    spark: SparkSettings = Field(default_factory=SparkSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, value: str) -> str:
        # Local roots are resolved once so every stage and every Spark worker sees one path.
        if "://" in value:
            return value.rstrip("/")
        path = Path(value).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"lakehouse root {path} exists and is not a folder")
        if "%" in str(path):  # delta-rs decodes "%41" in a path to "A": another folder
            raise ValueError(f"lakehouse root {path} holds '%', which Delta readers take as an escape; "
                             "choose a folder name without it")
        return str(path)

    @model_validator(mode="after")
    def _stop_metric_is_a_metric(self) -> Settings:
        if self.training.stop_metric is not None:
            check_metric("training.stop_metric", self.training.stop_metric, self.evaluation.ks)
        return self

    @property
    def stop_metric(self) -> str:
        """The validation metric training stops on (``training.stop_metric`` or the gate's)."""
        return self.training.stop_metric or self.evaluation.gate_metric

    @property
    def kafka_bootstrap_servers(self) -> str:
        """The stream's Kafka cluster (``serving.stream.kafka.bootstrap_servers``, else the local broker)."""
        return self.serving.stream.kafka.bootstrap_servers or f"127.0.0.1:{self.broker.port}"

    @property
    def model_max_length(self) -> int:
        """Sequence length the models take (``training.max_length`` or the gold sequences')."""
        return self.training.max_length or self.features.max_sequence_length


def check_metric(key: str, name: str, ks: list[int]) -> None:
    """``name`` must be a metric evaluation reports for the cut-offs ``ks``."""
    known = metric_names(ks)
    if name not in known:
        raise ValueError(f"{key} {name!r} is not one of {', '.join(known)} (evaluation.ks: {ks})")


def load_settings(
    config_path: str | Path | None = None,
    *,
    overrides: Iterable[str] = (),
    root: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from a YAML file, ``RECSYS__*`` variables and ``key=value`` overrides.

    Args:
        config_path: YAML file; default ``$RECSYS_CONFIG``, else ``conf/local.yaml`` when present,
            else the built-in defaults (which equal ``conf/local.yaml``).
        overrides: ``dotted.key=value`` strings, as given to ``--set``.
        root: lakehouse root, as given to ``--root``; wins over everything else.
        environ: environment to read overrides from (default ``os.environ``).

    Raises:
        ConfigError: unknown key, wrong type, unreadable file; the message names the key.
    """
    environ = os.environ if environ is None else environ
    data = _read_yaml(_config_file(config_path, environ))
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(data, key, _parse_value(raw), origin=f"environment variable {name}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set_dotted(data, key.strip(), _parse_value(raw), origin=f"--set {item}")
    if root is not None:
        data["root"] = str(root)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def _config_file(config_path: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    if config_path is not None:
        return Path(config_path)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


class _RepeatedKeyError(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps only the last of a repeated key; here a repeated key is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _RepeatedKeyError(f"repeats the key {key!r} (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _read_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        # A SafeLoader subclass: no arbitrary Python objects.
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read config file {path}: {reason}") from exc
    except _RepeatedKeyError as exc:
        raise ConfigError(f"config file {path} {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(exc)}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _parse_value(raw: str) -> Any:
    """Turn an override string into a value; pydantic coerces plain strings to the field type."""
    text = raw.strip()
    if text.lower() in {"null", "none", "~"}:
        return None
    if text.startswith(("[", "{")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse override value {raw!r}: {_one_line(exc)}") from exc
    return text


def _set_dotted(data: dict[str, Any], key: str, value: Any, *, origin: str) -> None:
    """Set ``a.b.c`` in nested dicts, refusing keys the settings model does not have.

    A ``dict`` field (``spark.conf``) takes the rest of the key verbatim, since Spark property
    names contain dots themselves.
    """
    parts = key.split(".")
    model: type[BaseModel] = Settings
    node = data
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} (from {origin})")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if i == len(parts) - 1:
                raise ConfigError(f"config key {key!r} is a section; set one of its keys")
            if node.get(part) is None:  # absent, or a section commented out in the YAML
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} must be a mapping")
            model = annotation
            continue
        if (get_origin(annotation) or annotation) is dict and i < len(parts) - 1:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} must be a mapping")
            node[part][".".join(parts[i + 1 :])] = value
            return
        if i != len(parts) - 1:
            raise ConfigError(f"unknown config key {key!r} (from {origin})")
        node[part] = value
        return


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "<top level>"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown config key {key!r}")
        else:
            problems.append(f"config key {key!r}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(problems)


def describe_settings() -> list[tuple[str, str, str]]:
    """Every config key with its default and help text, for ``recsys config --explain``."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            choices = get_args(annotation) if get_origin(annotation) is Literal else ()
            help_text = field.description or ""
            if choices:
                help_text = f"{help_text} One of: {', '.join(map(str, choices))}.".strip()
            rows.append((f"{prefix}{name}", repr(default), help_text))

    walk(Settings, "")
    return rows
