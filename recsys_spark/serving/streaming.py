"""``recsys stream``: nearline updates of the serving table with Spark Structured Streaming.

Each micro-batch of events — lines of files landed in a folder, or messages of a Kafka topic
(``serving.stream.source``; one event per message, its source named ``kafka:<topic>/<partition>/<offset>``)
— goes through ``NearlineSink``:

1. validate exactly like ingest (``parse_lines``): bad lines -> ``quarantine/events`` with their
   reason, every raw line -> ``bronze/events_raw``;
2. fold the good events into each touched user's recent history (``serving/user_state``; a user
   seen for the first time starts from ``gold/user_sequences``);
3. re-score only the touched users with the registry's champion — re-loaded when the alias
   moves — through the same business rules as batch scoring, and MERGE their
   ``source = nearline`` rows into ``serving/recommendations`` (only over rows of an older
   micro-batch, so a list never regresses);
4. append the batch's counts and event-time -> commit latencies to ``ops/stream_metrics``.

Exactly once: the checkpoint replays an unfinished micro-batch with the same id and files, and
every write carries the Delta application transaction (``app_id``, batch id), so a table that
already committed the batch skips it. State merges are idempotent (events are deduplicated by
their key), so recomputing a batch whose state was already committed gives the same lists.
Keying on the batch id is sound because Spark writes a batch's offsets before running it. Files
that no written offsets cover yet may be grouped differently after a restart (the file source
folds a file it had logged for its next batch into the batch it plans then), so batch ids are
lineage: every table's content equals an uninterrupted run's, not which batch wrote each row.
A Kafka micro-batch is an offset range per partition, logged before it runs, so a replayed batch
reads the very same messages. Messages the query has not read that are gone from the topic
(deleted, recreated, aged out) stop it with a line naming the topic, unless
``serving.stream.kafka.fail_on_data_loss`` is false.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.errors import AnalysisException, StreamingQueryException
from pyspark.sql import functions as F

from recsys_spark.config import Settings
from recsys_spark.constants import (
    BEHAVIOR,
    BEHAVIORS,
    BOUGHT_ITEMS,
    BRONZE_EVENTS_RAW,
    EVENT_TS,
    GENERATED_AT,
    GOLD_ITEM_FEATURES,
    GOLD_USER_SEQUENCES,
    INTRA_LIST_DIVERSITY,
    ITEM_ID,
    ITEM_IDS,
    ITEM_IDX,
    LAST_EVENT_TS,
    LAST_STEP_TS,
    MODEL_NAME,
    MODEL_VERSION,
    NEARLINE_SOURCE,
    OPS_STREAM_METRICS,
    QUARANTINE_EVENTS,
    RAW,
    REASON,
    SCORES,
    SEQUENCE_BEHAVIORS,
    SEQUENCE_GAPS,
    SEQUENCE_ITEMS,
    SERVING_RECOMMENDATIONS,
    SERVING_USER_STATE,
    SILVER_ITEM_INDEX,
    SILVER_USER_INDEX,
    SOURCE,
    SOURCE_FILE,
    STREAM_BATCH_ID,
    USER_ID,
    USER_IDX,
)
from recsys_spark.errors import EngineUnavailableError, ModelIntegrityError, StreamFailedError
from recsys_spark.ingest.parse import parse_lines
from recsys_spark.ingest.pipeline import validation_rules
from recsys_spark.ingest.transforms import BRONZE_COLUMNS, QUARANTINE_COLUMNS, lineage
from recsys_spark.logs import get_logger, log_event, log_event_at
from recsys_spark.serving.schemas import (
    RECOMMENDATION_SCHEMA,
    STATE_BEHAVIORS,
    STATE_BOUGHT,
    STATE_EVENT_TS,
    STREAM_METRICS_SCHEMA,
    UPDATED_AT,
    USER_STATE_SCHEMA,
)
from recsys_spark.serving.scoring import RuleScorer, champion_version, load_champion
from recsys_spark.serving.stream_guard import hold_query_lock
from recsys_spark.spark import literal_path
from recsys_spark.storage import Idempotency, Lakehouse, read_table, table_version

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator

    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

log = get_logger("stream")

def landing_dir(settings: Settings) -> str:
    return settings.serving.stream.landing or f"{settings.root}/_landing"


def checkpoint_dir(settings: Settings) -> str:
    return settings.serving.stream.checkpoint or f"{settings.root}/_checkpoints/nearline"


@dataclass
class UserHistory:
    item_ids: list[int]
    behaviors: list[str]
    event_ts: list[datetime]
    bought: set[int]


def merge_history(history: UserHistory, events: list[tuple[int, str, datetime]], max_length: int) -> UserHistory:
    """Add events to a history: deduplicated by (item, behaviour, time), time-ordered, the most
    recent ``max_length`` kept. Merging the same events twice changes nothing."""
    known = set(zip(history.item_ids, history.behaviors, history.event_ts, strict=True))
    merged = list(known | set(events))
    merged.sort(key=lambda e: (e[2], e[0], e[1]))
    merged = merged[-max_length:]
    bought = history.bought | {item for item, behavior, _ in events if behavior == "buy"}
    return UserHistory([e[0] for e in merged], [e[1] for e in merged], [e[2] for e in merged], bought)


class _Dictionary:
    """Raw ids <-> dense indices of a silver index table, reloaded when it grows."""

    def __init__(self, root: str, table: str, idx: str, raw: str) -> None:
        self.root, self.table, self.idx, self.raw = root, table, idx, raw
        self.version: int | None = None
        self.raw_by_index = np.zeros(0, dtype=np.int64)
        self.index_by_raw: dict[int, int] = {}

    def refresh(self) -> None:
        version = table_version(self.root, self.table)
        if version is None or version == self.version:  # no dictionary yet, or no change
            return
        data = read_table(self.root, self.table, version=version, columns=[self.idx, self.raw])
        index, raw = data.column(self.idx).to_numpy(), data.column(self.raw).to_numpy()
        self.raw_by_index = np.full(int(index.max(initial=-1)) + 1, -1, dtype=np.int64)
        self.raw_by_index[index] = raw
        self.index_by_raw = dict(zip(raw.tolist(), index.tolist(), strict=True))
        self.version = version


def _user_rows(root: str, table: str, version: int | None, users: list[int]) -> pa.Table | None:
    """The rows of ``users`` in the table as of ``version`` (None: no table yet)."""
    if version is None or not users:
        return None
    return read_table(root, table, version=version, filter=pc.field(USER_ID).isin(users))


def _stamped(rows: pa.Table, run_id: str, at: datetime) -> pa.Table:
    """``rows`` with the lineage columns of ``ingest.transforms.lineage`` appended."""
    for name, value in lineage(run_id, at).items():
        # typed from the value: an empty slice would otherwise get Arrow's null type, which the
        # delta-spark engine refuses as a schema change
        rows = rows.append_column(name, pa.array([value] * rows.num_rows, type=pa.scalar(value).type))
    return rows


class _Laps:
    """Seconds spent in each step of a micro-batch, for the batch's log line."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[f"t_{step}"] = round(now - self._last, 3)
        self._last = now


class NearlineSink:
    """The ``foreachBatch`` function of the nearline query (see module docstring)."""

    def __init__(self, spark: SparkSession, lake: Lakehouse, settings: Settings) -> None:
        self.spark = spark
        self.lake = lake
        self.settings = settings
        self.fmt = settings.serving.stream.format
        self._app_id: str | None = None
        self.max_length = settings.features.max_sequence_length
        self.scorer: RuleScorer | None = None
        self._refused: set[str] = set()  # champion versions whose files failed verification
        self._features_version = -1
        self.items = _Dictionary(lake.root, SILVER_ITEM_INDEX, ITEM_IDX, ITEM_ID)
        self.users = _Dictionary(lake.root, SILVER_USER_INDEX, USER_IDX, USER_ID)
        self._gold_version: int | None = None
        self._gold_merged: set[int] = set()  # users whose gold row is in their state, at _gold_version

    def warm_up(self) -> None:
        """Load the champion and the id dictionaries, and run the parsing plan once on a
        throw-away line, before the first micro-batch (which would otherwise pay for all of it)."""
        self._current_scorer()
        self.users.refresh()
        self.items.refresh()
        sample = self.spark.createDataFrame([("", "warm-up")], "value string, file string")
        self._slices(sample, "warm-up", datetime.now(UTC))

    def _current_scorer(self) -> RuleScorer:
        """The champion's scorer, re-built when the alias moves or gold/item_features (categories
        and popularity for the rules) has a new version."""
        version = champion_version(self.settings)
        features = self.lake.version(GOLD_ITEM_FEATURES) if self.lake.exists(GOLD_ITEM_FEATURES) else -1
        if self.scorer is None or (self.scorer.champion.version != version and version not in self._refused):
            previous = None if self.scorer is None else self.scorer.champion.version
            try:
                champion = load_champion(self.settings, version)
            except ModelIntegrityError as exc:
                if self.scorer is None:
                    raise
                # A tampered new champion: keep serving the verified one, say so once.
                self._refused.add(version)
                log_event_at(log, logging.ERROR, "stream.model_refused", version=version,
                          serving=previous, error=str(exc))
                return self.scorer
            self.scorer = RuleScorer.build(self.lake, self.settings, champion)
            log_event(log, "stream.model_loaded", version=version, previous=previous)
        elif features != self._features_version:
            self.scorer = RuleScorer.build(self.lake, self.settings, self.scorer.champion)
            log_event(log, "stream.catalogue_reloaded", item_features_version=features)
        self._features_version = features
        return self.scorer

    @property
    def app_id(self) -> str:
        """``<serving.stream.app_id>-<query id>``: the query id lives in the checkpoint, so a
        restart keeps it and a new checkpoint (whose batch ids start again at 0) gets a new one
        instead of having its batches mistaken for ones already committed."""
        if self._app_id is None:
            metadata = json.loads((Path(checkpoint_dir(self.settings)) / "metadata").read_text())
            self._app_id = f"{self.settings.serving.stream.app_id}-{metadata['id'][:8]}"
        return self._app_id

    def _once(self, batch_id: int) -> Idempotency:
        return Idempotency(self.app_id, batch_id)

    def __call__(self, df: DataFrame, batch_id: int) -> None:
        done = self.lake.transaction_version(OPS_STREAM_METRICS, self.app_id) if self.lake.exists(
            OPS_STREAM_METRICS) else None
        if done is not None and done >= batch_id:
            log_event(log, "stream.batch_replayed", batch_id=batch_id, action="skipped, already committed")
            return
        started = time.perf_counter()
        laps = _Laps()
        now = datetime.now(UTC)
        run_id = f"{self.app_id}-{batch_id}"
        bronze, bad, good = self._slices(df, run_id, now)
        rows_in = bronze.num_rows
        if rows_in == 0:
            return
        laps("parse")
        self.lake.write(bronze, BRONZE_EVENTS_RAW, partition_by=("ingest_date",), idempotency=self._once(batch_id))
        self.lake.write(bad, QUARANTINE_EVENTS, partition_by=("ingest_date",), idempotency=self._once(batch_id))
        laps("bronze")
        scorer = self._current_scorer()
        laps("model")
        users_updated = self._update_users(good, batch_id, now, scorer, laps)
        committed = datetime.now(UTC)
        latencies = np.sort([(committed - ts).total_seconds() for ts in good.column(EVENT_TS).to_pylist()])
        metrics = {
            "batch_id": batch_id, "committed_at": committed, "rows_in": rows_in, "rows_clean": good.num_rows,
            "rows_quarantined": bad.num_rows, "users_updated": users_updated,
            "latency_p50_s": float(np.percentile(latencies, 50)) if len(latencies) else None,
            "latency_p95_s": float(np.percentile(latencies, 95)) if len(latencies) else None,
            "latency_max_s": float(latencies[-1]) if len(latencies) else None,
            "processing_s": time.perf_counter() - started, "model_version": scorer.champion.version,
        }
        table = pa.Table.from_pylist([metrics], schema=STREAM_METRICS_SCHEMA)
        self.lake.write(table, OPS_STREAM_METRICS, idempotency=self._once(batch_id))
        laps("metrics")
        log_event(log, "stream.batch", **{k: (round(v, 3) if isinstance(v, float) else v)
                                         for k, v in metrics.items() if k != "committed_at"}, **laps.seconds)

    def _slices(self, df: DataFrame, run_id: str, now: datetime) -> tuple[pa.Table, pa.Table, pa.Table]:
        """The micro-batch's bronze rows, quarantined rows and good events, as Arrow.

        A micro-batch is small, so its parsed lines (one row per line read, bad ones with a
        reason) come to the driver in one Spark job and are sliced there; the storage layer then
        appends the slices without a Spark write job each. On a 1-second trigger the fixed costs
        of Spark jobs, not the data, decide the latency.
        """
        raw = df.select(F.col("value").alias(RAW), F.col("file").alias(SOURCE_FILE))
        rows = parse_lines(raw, self.fmt, validation_rules(self.settings, now)).toArrow()
        failed = pc.is_valid(rows.column(REASON))
        bronze = _stamped(rows.select(list(BRONZE_COLUMNS)), run_id, now)
        bad = _stamped(rows.filter(failed).select(list(QUARANTINE_COLUMNS)), run_id, now)
        good = rows.filter(pc.invert(failed)).select([USER_ID, ITEM_ID, BEHAVIOR, EVENT_TS])
        return bronze, bad, good

    def _update_users(self, good: pa.Table, batch_id: int, now: datetime, scorer: RuleScorer,
                      laps: _Laps) -> int:
        if good.num_rows == 0:
            return 0
        events: dict[int, list[tuple[int, str, datetime]]] = {}
        for user, item, behavior, ts in zip(*(good.column(c).to_pylist() for c in
                                              (USER_ID, ITEM_ID, BEHAVIOR, EVENT_TS)), strict=True):
            events.setdefault(user, []).append((item, behavior, ts))
        touched = sorted(events)
        histories = self._histories(touched)
        laps("read_state")
        merged = [merge_history(histories[u], events[u], self.max_length) for u in touched]
        state = pa.Table.from_pylist([
            {USER_ID: u, ITEM_IDS: h.item_ids, STATE_BEHAVIORS: h.behaviors, STATE_EVENT_TS: h.event_ts,
             STATE_BOUGHT: sorted(h.bought), LAST_EVENT_TS: h.event_ts[-1], STREAM_BATCH_ID: batch_id,
             UPDATED_AT: now}
            for u, h in zip(touched, merged, strict=True)
        ], schema=USER_STATE_SCHEMA)
        self.lake.upsert(state, SERVING_USER_STATE, keys=[USER_ID],
                         idempotency=self._once(batch_id))
        laps("merge_state")

        model = scorer.champion.model
        index_histories = [model.item_index(np.asarray(h.item_ids)) for h in merged]
        index_histories = [h[h >= 0] for h in index_histories]
        bought = [model.item_index(np.asarray(sorted(h.bought), dtype=np.int64)) for h in merged]
        bought = [b[b >= 0] for b in bought]
        self.users.refresh()
        user_idx = np.asarray([self.users.index_by_raw.get(u, -1) for u in touched], dtype=np.int64)
        ranked = scorer.recommend(index_histories, user_idx, bought)
        laps("score")
        generated = datetime.now(UTC)
        rows = pa.Table.from_pylist([
            {USER_ID: u, USER_IDX: int(i) if i >= 0 else None, ITEM_IDS: it, SCORES: sc,
             MODEL_NAME: name, MODEL_VERSION: scorer.champion.version,
             GENERATED_AT: generated, LAST_EVENT_TS: h.event_ts[-1], STREAM_BATCH_ID: batch_id,
             INTRA_LIST_DIVERSITY: float(d), SOURCE: NEARLINE_SOURCE}
            for u, i, it, sc, name, d, h in zip(touched, user_idx, ranked.items, ranked.scores,
                                                ranked.model_names(scorer.champion.name), ranked.diversity,
                                                merged, strict=True)
        ], schema=RECOMMENDATION_SCHEMA)
        self.lake.upsert(rows, SERVING_RECOMMENDATIONS, keys=[USER_ID, SOURCE],
                         partition_by=(SOURCE,),
                         # Newer by wall clock, not by batch id: a new checkpoint restarts ids at 0.
                         update_condition="s.generated_at >= t.generated_at OR t.generated_at IS NULL",
                         idempotency=self._once(batch_id))
        laps("merge_recommendations")
        return len(touched)

    def _histories(self, users: list[int]) -> dict[int, UserHistory]:
        """Current state of ``users``; a user new to the stream starts from their gold sequence.
        Purchases that reached gold after the user's state began (a batch ingest) join its
        bought set, so nearline never offers them again."""
        found: dict[int, UserHistory] = {}
        root = self.lake.root
        state = _user_rows(root, SERVING_USER_STATE, table_version(root, SERVING_USER_STATE), users)
        if state is not None:
            for row in state.to_pylist():
                found[row[USER_ID]] = UserHistory(row[ITEM_IDS], row[STATE_BEHAVIORS], row[STATE_EVENT_TS],
                                                  set(row[STATE_BOUGHT]))
        gold = table_version(root, GOLD_USER_SEQUENCES)
        sequences = _user_rows(root, GOLD_USER_SEQUENCES, gold, self._gold_to_merge(gold, users, in_state=found.keys()))
        if sequences is not None and sequences.num_rows:
            self.items.refresh()
            for row in sequences.to_pylist():
                gold_history = self._from_sequence(row)
                if row[USER_ID] in found:
                    found[row[USER_ID]].bought |= gold_history.bought
                else:
                    found[row[USER_ID]] = gold_history
        for user in users:
            found.setdefault(user, UserHistory([], [], [], set()))
        return found

    def _gold_to_merge(self, gold: int | None, users: list[int], in_state: Collection[int]) -> list[int]:
        """The users whose gold row this micro-batch reads: those new to the stream (they start
        from it) and, once per gold version, those with state (gold's purchases join their bought
        set; only a features run makes a new version) — not every touched user every batch."""
        if gold is None:
            return []
        if gold != self._gold_version:
            self._gold_version, self._gold_merged = gold, set()
        wanted = [u for u in users if u not in in_state or u not in self._gold_merged]
        # Marked before the state commit: a failing micro-batch stops the query, and a new
        # query starts from a new sink (and re-reads; merging gold twice changes nothing).
        self._gold_merged.update(wanted)
        return wanted

    def _from_sequence(self, row: dict[str, Any]) -> UserHistory:
        items = self.items.raw_by_index[np.asarray(row[SEQUENCE_ITEMS], dtype=np.int64)].tolist()
        behaviors = [BEHAVIORS[code - 1] for code in row[SEQUENCE_BEHAVIORS]]
        # gaps[j] = ts[j] - ts[j-1]: walk back from the last event's time
        after = np.concatenate([np.cumsum(np.asarray(row[SEQUENCE_GAPS][:0:-1], dtype=np.int64))[::-1], [0]])
        last = row[LAST_STEP_TS]
        times = [datetime.fromtimestamp(last.timestamp() - float(s), UTC) for s in after]
        bought = {item for item, behavior in zip(items, behaviors, strict=True) if behavior == "buy"}
        if row[BOUGHT_ITEMS] is not None:  # every purchase, not only the window's
            bought |= set(self.items.raw_by_index[np.asarray(row[BOUGHT_ITEMS], dtype=np.int64)].tolist())
        return UserHistory(items, behaviors, times, bought)


def source_frame(spark: SparkSession, settings: Settings) -> DataFrame:
    """The stream of raw lines: ``value`` (the line) and ``file`` (where it came from: the file,
    or ``kafka:<topic>/<partition>/<offset>``)."""
    cfg = settings.serving.stream
    if cfg.source == "kafka":
        reader = spark.readStream.format("kafka").options(**kafka_options(settings))
        try:
            frame = reader.load()
        except AnalysisException as exc:
            if "kafka" in str(exc).lower() and "data source" in str(exc).lower():
                where = Path(settings.spark.jars_dir).resolve() if settings.spark.jars_dir else "unset"
                raise EngineUnavailableError(
                    f"serving.stream.source=kafka needs Spark's Kafka connector, which is not on the classpath "
                    f"(spark.jars_dir: {where}; `make setup` fetches it)") from exc
            raise
        # A message without a value (a tombstone) is an empty line: quarantined like one.
        return frame.select(F.coalesce(F.col("value").cast("string"), F.lit("")).alias("value"),
                            F.format_string("kafka:%s/%d/%d", "topic", "partition", "offset").alias("file"))
    landing = landing_dir(settings)
    Path(landing).mkdir(parents=True, exist_ok=True)
    frame = (spark.readStream.format("text").option("maxFilesPerTrigger", cfg.max_files_per_trigger)
             .load(literal_path(landing)))
    return frame.select("value", F.col("_metadata.file_path").alias("file"))


def kafka_options(settings: Settings) -> dict[str, str]:
    """The options of Spark's Kafka source for ``serving.stream.kafka``."""
    kafka = settings.serving.stream.kafka
    options = {
        "kafka.bootstrap.servers": settings.kafka_bootstrap_servers,
        "subscribe": kafka.topic,
        "startingOffsets": kafka.starting_offsets,
        "failOnDataLoss": str(kafka.fail_on_data_loss).lower(),
        **kafka.options,
    }
    if kafka.max_offsets_per_trigger is not None:
        options["maxOffsetsPerTrigger"] = str(kafka.max_offsets_per_trigger)
    return options


ADAPTIVE = "spark.sql.adaptive.enabled"


def start_stream(spark: SparkSession, lake: Lakehouse, settings: Settings) -> StreamingQuery:
    sink = NearlineSink(spark, lake, settings)
    # Load the champion now: no champion fails at start, and the first events do not wait for it.
    sink.warm_up()
    cfg = settings.serving.stream
    # A query runs without adaptive execution anyway and warns when the session has it on (the
    # query keeps the conf it started with): off for the start only, for the session's batch jobs.
    adaptive = spark.conf.get(ADAPTIVE, None)
    spark.conf.set(ADAPTIVE, "false")
    try:
        return (source_frame(spark, settings).writeStream
                .foreachBatch(sink)
                .option("checkpointLocation", checkpoint_dir(settings))
                .trigger(processingTime=f"{cfg.trigger_seconds} seconds")
                .queryName("recsys-nearline").start())
    finally:
        if adaptive is None:
            spark.conf.unset(ADAPTIVE)
        else:
            spark.conf.set(ADAPTIVE, adaptive)


def run_stream(
    spark: SparkSession, lake: Lakehouse, settings: Settings, *, until_idle: float | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run the query until stopped (Ctrl-C / SIGTERM), ``until_idle`` seconds without new data,
    or ``timeout`` seconds; finishes the data already landed before stopping. One query runs per
    checkpoint: a second one fails with ``StreamAlreadyRunningError`` (see ``stream_guard``)."""
    with hold_query_lock(checkpoint_dir(settings)) as record_phase:
        query = start_stream(spark, lake, settings)
        record_phase("running")
        return _run_until_stopped(query, settings, until_idle=until_idle, timeout=timeout)


def _run_until_stopped(
    query: StreamingQuery, settings: Settings, *, until_idle: float | None, timeout: float | None
) -> dict[str, Any]:
    cfg = settings.serving.stream
    source = ({"topic": cfg.kafka.topic, "bootstrap_servers": settings.kafka_bootstrap_servers}
              if cfg.source == "kafka" else {"landing": landing_dir(settings)})
    log_event(log, "stream.start", **source, checkpoint=checkpoint_dir(settings))
    stop = threading.Event()
    with _stop_on_sigterm(stop):
        started = time.monotonic()
        batches = _watch(query, stop, started, until_idle=until_idle, timeout=timeout)
        log_event(log, "stream.stop", batches=batches, seconds=round(time.monotonic() - started, 1))
    if query.exception() is not None:
        raise StreamFailedError(failure_message(" ".join(str(query.exception()).split()), settings))
    return {"batches": batches, "seconds": round(time.monotonic() - started, 1),
            "checkpoint": checkpoint_dir(settings), **source}


def failure_message(error: str, settings: Settings) -> str:
    """One line for a failed query: what happened to a Kafka topic in words, else Spark's error
    without the query plan it appends."""
    error = error.split(" === Streaming Query === ")[0]
    cfg = settings.serving.stream
    if cfg.source != "kafka":
        return f"nearline query failed: {error[:2000]}"
    where = f"Kafka topic {cfg.kafka.topic!r} at {settings.kafka_bootstrap_servers}"
    after = ("The tables hold every micro-batch committed before; restart the stream on a new checkpoint "
             "(serving.stream.checkpoint) to read what the topic holds now")
    if "failOnDataLoss" in error:
        found = re.search(r"Reason: (.+?)(?: with consumer group [^ ]+)?\.(?: |$)", error)
        reason = found[1] if found else error[:300]
        return (f"{where} no longer holds messages the query has not read yet ({reason}): "
                f"the topic was deleted or recreated, or retention removed them. {after}, or set "
                "serving.stream.kafka.fail_on_data_loss=false to skip what is gone")
    if "UnknownTopicOrPartition" in error:
        return f"{where} (or one of its partitions) is gone: it was deleted while the query read it. {after}"
    if "kafka.common.errors.TimeoutException" in error:
        cause = error.split("TimeoutException: ", 1)[1][:300]
        return (f"no Kafka broker at {settings.kafka_bootstrap_servers} answered for topic {cfg.kafka.topic!r} "
                f"within the consumer's timeouts and retries ({cause}). Restart the stream once the cluster is "
                "back: it resumes from its checkpoint, without losing or repeating a message")
    return f"nearline query on {where} failed: {error[:2000]}"


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """SIGTERM sets ``stop`` during the block (the query then finishes what has landed); the
    previous handler is back afterwards. Signals reach the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch(query: StreamingQuery, stop: threading.Event, started: float, *, until_idle: float | None,
           timeout: float | None) -> int:
    """Wait until ``stop``, Ctrl-C, ``until_idle`` seconds without new data or ``timeout``;
    then finish the data already landed and stop the query. Returns the micro-batches run."""
    batches = 0
    last_data = started
    try:
        while not stop.is_set():
            if query.awaitTermination(0.5):  # type: ignore[arg-type]  # seconds; pyspark takes floats
                break
            progress = query.lastProgress
            if progress and progress.get("numInputRows", 0) > 0 and progress["batchId"] >= batches:
                batches, last_data = progress["batchId"] + 1, time.monotonic()
            now = time.monotonic()
            if until_idle is not None and now - last_data >= until_idle and not query.status["isDataAvailable"]:
                break
            if timeout is not None and now - started >= timeout:
                break
    except KeyboardInterrupt:
        pass
    except StreamingQueryException:  # the query failed: run_stream reports its exception
        pass
    finally:
        if query.isActive:
            with contextlib.suppress(StreamingQueryException):  # failing now: reported the same way
                query.processAllAvailable()  # commit what has landed before stopping
            query.stop()
    return batches
