"""``recsys replay``: play a behaviour log into a landing folder or a Kafka topic, as collectors would.

Events are published in event-time order, a tick's worth at a time (every half second):

* ``LandingFolder``: each tick one small file, published atomically (written under a hidden name,
  then renamed: Spark's file source ignores names starting with ``.``);
* ``KafkaTopic``: each event one message, keyed by its user id, so that one user's events land in
  one partition and stay in order there (a line without a readable user id gets no key). The
  topic is created with ``partitions`` partitions when it does not exist yet; the producer is
  idempotent, so its retries (a broker that went away) never store a message twice.

Pace: a steady ``rate`` in events per second, or the log's own timing sped up ``speedup`` times.
By default each event's timestamp is rewritten to the moment it is published, so the stream's
event-time latency measures the platform, not the age of the log; ``keep_time`` keeps the
original times. Lines that cannot be parsed are passed through untouched (the stream quarantines
them), in their original position.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from recsys_spark.errors import InputDataError, KafkaUnavailableError
from recsys_spark.logs import get_logger, log_event

log = get_logger("replay")

TICK_SECONDS = 0.5
MAX_SECONDS = 366 * 86_400
DEFAULT_PARTITIONS = 3
KAFKA_TIMEOUT_SECONDS = 30.0  # topic metadata and creation
# A message not acknowledged within this long fails the replay; until then the producer retries
# (a broker restarting, a leader moving) and the replay waits for it at the end.
DELIVERY_TIMEOUT_SECONDS = 300.0


@dataclass
class ReplayReport:
    events: int
    seconds: float
    sink: dict[str, Any]  # where the events went (the sink's ``summary``)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


class Sink(Protocol):
    """Where ``replay`` publishes: ``open`` once, ``publish`` a tick's (key, line) pairs, ``close``."""

    def open(self, started: float) -> None: ...

    def publish(self, events: list[tuple[str | None, str]]) -> None: ...

    def close(self) -> None: ...

    def summary(self) -> dict[str, Any]: ...


class LandingFolder:
    """A tick's lines as one file of ``folder``, renamed into place whole."""

    def __init__(self, folder: str | Path, fmt: str) -> None:
        self.folder = Path(folder)
        self.suffix = "csv" if fmt == "taobao" else "jsonl"
        self.files = 0
        self._prefix = ""

    def open(self, started: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # the run id: replays started in the same second write distinct names
        self._prefix = f"events-{int(started)}-{uuid.uuid4().hex[:8]}"

    def publish(self, events: list[tuple[str | None, str]]) -> None:
        name = f"{self._prefix}-{self.files:07d}.{self.suffix}"
        hidden = self.folder / f".{name}.tmp"
        hidden.write_text("\n".join(line for _, line in events) + "\n", encoding="utf-8", errors="surrogateescape")
        os.replace(hidden, self.folder / name)  # atomic: the stream never sees half a file
        self.files += 1

    def close(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {"sink": "landing", "landing": str(self.folder), "files": self.files}


class KafkaTopic:
    """Each line one message of ``topic``, keyed by user id (see the module docstring)."""

    def __init__(self, bootstrap_servers: str, topic: str, *, partitions: int = DEFAULT_PARTITIONS) -> None:
        self.bootstrap_servers, self.topic, self.partitions = bootstrap_servers, topic, partitions
        self.messages = 0
        self._failed: list[str] = []
        self._producer: Any = None

    def open(self, started: float) -> None:
        from confluent_kafka import Producer

        self.partitions = ensure_topic(self.bootstrap_servers, self.topic, self.partitions)
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers, "client.id": "recsys-replay",
            # retries after a lost broker never store a message twice, and keep each partition's order
            "enable.idempotence": True, "linger.ms": 5, "logger": log,
            "message.timeout.ms": int(DELIVERY_TIMEOUT_SECONDS * 1000),
        }
        self._producer = Producer(config)

    def publish(self, events: list[tuple[str | None, str]]) -> None:
        for key, line in events:
            value = line.encode("utf-8", errors="surrogateescape")
            while True:
                try:
                    self._producer.produce(self.topic, value=value, key=key, on_delivery=self._delivered)
                    break
                except BufferError:  # the local queue is full (a broker away): wait for deliveries
                    self._producer.poll(0.1)
            self.messages += 1
        self._producer.poll(0)

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            self._failed.append(str(error))

    def close(self) -> None:
        if self._producer is None:
            return
        pending = self._producer.flush(DELIVERY_TIMEOUT_SECONDS + 10)  # each message succeeds or fails by then
        self._producer = None  # its client threads end with it
        if pending or self._failed:
            cause = self._failed[0] if self._failed else f"{pending} still queued"
            raise KafkaUnavailableError(f"{pending + len(self._failed)} of {self.messages} messages were not "
                                        f"delivered to Kafka topic {self.topic!r} at {self.bootstrap_servers}: {cause}")

    def summary(self) -> dict[str, Any]:
        return {"sink": "kafka", "topic": self.topic, "bootstrap_servers": self.bootstrap_servers,
                "partitions": self.partitions, "messages": self.messages}


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int) -> int:
    """Create ``topic`` with ``partitions`` partitions (the cluster's default replication) unless
    it exists; returns its partition count. A topic still being deleted is waited for."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, "logger": log}
    admin = AdminClient(config)
    deadline = time.monotonic() + KAFKA_TIMEOUT_SECONDS
    while True:
        try:
            # every topic's metadata: asking for this one alone would auto-create it on brokers
            # that allow that, with their default partition count
            existing = admin.list_topics(timeout=KAFKA_TIMEOUT_SECONDS).topics.get(topic)
            if existing is not None and existing.error is None:
                return len(existing.partitions)
            future = admin.create_topics([NewTopic(topic, num_partitions=partitions)],
                                         operation_timeout=KAFKA_TIMEOUT_SECONDS)[topic]
            future.result(timeout=KAFKA_TIMEOUT_SECONDS)
        except KafkaException as exc:
            # created meanwhile by another client, or not yet gone after a deletion: look again
            if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise KafkaUnavailableError(f"Kafka at {bootstrap_servers}: cannot use topic {topic!r}: {exc}") from exc
        log_event(log, "replay.topic_created", topic=topic, partitions=partitions)
        return partitions


# Times outside these bounds are what ingest quarantines (timestamp_out_of_range).
_EARLIEST = 946_684_800.0  # 2000-01-01
_LATEST_AHEAD = 86_400.0  # a day after now


def _event_time(line: str, fmt: str) -> float | None:
    """The line's event time in Unix seconds, or None when the stream would reject the line's
    time (unparseable, out of range, or a JSON object it calls malformed): such lines are
    published unchanged and never drive the pace."""
    try:
        if fmt == "taobao":
            seconds = float(line.split(",")[4])
        else:
            value = json.loads(line, object_pairs_hook=_unique_keys)["ts"]
            if isinstance(value, str) and not value.strip().replace(".", "", 1).isdigit():
                moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
                seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
            elif isinstance(value, bool):
                return None
            else:
                seconds = float(value)
                seconds = seconds / 1000 if seconds > 1e11 else seconds
    except (IndexError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if not _EARLIEST <= seconds <= time.time() + _LATEST_AHEAD:
        return None
    return seconds


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("repeated key")
    return dict(pairs)


def _user_key(line: str, fmt: str) -> str | None:
    """The line's user id as a message key (None where the line has no readable one)."""
    try:
        user = line.split(",")[0] if fmt == "taobao" else json.loads(line)["user_id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    text = str(user).strip()
    return text if text.isdigit() else None


def _retimed(line: str, fmt: str, now: float) -> str:
    if fmt == "taobao":
        fields = line.split(",")
        fields[4] = str(int(now))
        return ",".join(fields)
    event = json.loads(line)
    event["ts"] = int(now * 1000)
    return json.dumps(event, separators=(",", ":"))


def read_events(path: Path, fmt: str, limit: int | None = None) -> list[tuple[float, int, str]]:
    """(event time, original position, line), ordered by time; unparseable lines keep the time of
    the line before them."""
    if fmt not in ("taobao", "jsonl"):
        raise InputDataError(f"replay supports taobao and jsonl, not {fmt!r}")
    if not path.is_file():
        raise InputDataError(f"replay input {path} does not exist")
    events: list[tuple[float, int, str]] = []
    last: float | None = None
    leading: list[tuple[int, str]] = []  # bad lines before the first good time
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for position, line in enumerate(handle):
            if limit is not None and position >= limit:
                break
            line = line.rstrip("\n")
            if not line:
                continue
            when = _event_time(line, fmt)
            last = when if when is not None else last
            if last is None:
                leading.append((position, line))
            else:
                events.append((last, position, line))
    if not events and not leading:
        raise InputDataError(f"replay input {path} holds no lines")
    first = events[0][0] if events else 0.0
    events = [(first, position, line) for position, line in leading] + events
    events.sort(key=lambda e: (e[0], e[1]))
    return events


def _ticks(events: list[tuple[float, int, str]], rate: float | None, speedup: float | None
           ) -> Iterator[tuple[float, list[tuple[float, int, str]]]]:
    """(offset in seconds from the start, events to publish then)."""
    if speedup is not None:
        start = events[0][0]
        batch: list[tuple[float, int, str]] = []
        due = 0.0
        for event in events:
            offset = (event[0] - start) / speedup
            if batch and offset >= due + TICK_SECONDS:
                yield due, batch
                batch, due = [], offset
            batch.append(event)
        if batch:
            yield due, batch
        return
    per_tick = max(1, round((rate or 100) * TICK_SECONDS))
    for tick, start in enumerate(range(0, len(events), per_tick)):
        yield tick * per_tick / (rate or 100), events[start : start + per_tick]


def replay(
    input_path: str | Path,
    fmt: str,
    sink: Sink,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    keep_time: bool = False,
    limit: int | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayReport:
    paces = [p for p in (rate, speedup) if p is not None]
    if len(paces) != 1:
        raise InputDataError("give exactly one of --rate and --speedup")
    pace = paces[0]
    if not (math.isfinite(pace) and pace > 0):
        raise InputDataError("--rate and --speedup must be positive finite numbers")
    events = read_events(Path(input_path), fmt, limit)
    duration = len(events) / pace if rate is not None else (events[-1][0] - events[0][0]) / pace
    if duration > MAX_SECONDS:  # a typo such as 1e-3 for 1e3; sleeps that long also overflow
        raise InputDataError(f"at this pace the replay would take {duration / 86_400:.3g} days "
                             f"(more than {MAX_SECONDS // 86_400} allowed): raise --rate or --speedup")
    started = clock()
    sink.open(started)
    try:
        for offset, batch in _ticks(events, rate, speedup):
            wait = started + offset - clock()
            if wait > 0:
                sleep(wait)
            now = clock()
            lines = [line if keep_time or _event_time(line, fmt) is None else _retimed(line, fmt, now)
                     for _, _, line in batch]
            sink.publish([(_user_key(line, fmt), line) for line in lines])
    finally:
        sink.close()  # what was published is delivered, also when interrupted
    return ReplayReport(len(events), max(clock() - started, 1e-9), sink.summary())
