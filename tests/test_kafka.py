"""Kafka: the local broker, ``recsys replay --sink kafka``, and the nearline stream reading a real
topic — the file source's work per micro-batch, exactly once across ``kill -9``, a broker outage,
lost messages and malformed ones. One broker (Apache Kafka's own, KRaft) serves the session."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pyspark.errors import StreamingQueryException

from recsys_spark.broker import LocalBroker, free_port
from recsys_spark.config import Settings
from recsys_spark.errors import BrokerError, StreamFailedError
from recsys_spark.serving.replay import KafkaTopic, ensure_topic, replay
from recsys_spark.serving.streaming import failure_message, kafka_options, run_stream, start_stream
from tests.conftest import JARS_DIR, QUIET, REPO, make_settings, run_cli
from tests.nearline import (
    assert_lineage_consistent,
    kill_9_mid_run,
    land,
    snapshot,
    stream_process,
    table,
)

KAFKA_JARS = REPO / ".jars" / "kafka"
HAVE_KAFKA = any(KAFKA_JARS.glob("kafka_2.13-*.jar")) and any(JARS_DIR.glob("spark-sql-kafka-0-10_*.jar"))
NO_KAFKA = (f"Apache Kafka's jars (in {KAFKA_JARS}) or Spark's Kafka connector (in {JARS_DIR}) are missing: "
            "`make setup` could not fetch them from Maven Central (see .jars/fetch*.log)")
FIRST_PORT = 19092  # the first port tried for the test broker (then upwards, skipping taken ones)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    if not HAVE_KAFKA:
        pytest.skip(NO_KAFKA)
    port = free_port(FIRST_PORT)
    local = LocalBroker(tmp_path_factory.mktemp("kafka"), port, free_port(port + 1), KAFKA_JARS)
    local.up(timeout=240, follow_parent=True)
    yield local
    local.down()


def new_topic(broker: LocalBroker, partitions: int = 3) -> str:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    ensure_topic(broker.bootstrap_servers, topic, partitions)
    return topic


def produce(broker: LocalBroker, topic: str, messages: list[tuple[str | None, bytes | str | None]]
            ) -> list[tuple[int, int]]:
    """Send (key, value) messages in order; returns each one's (partition, offset)."""
    placed: dict[int, tuple[int, int]] = {}
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "enable.idempotence": True})
    for number, (key, value) in enumerate(messages):
        producer.produce(topic, value=value, key=key,
                         on_delivery=lambda err, msg, n=number: placed.__setitem__(n, (msg.partition(), msg.offset())))
    assert producer.flush(60) == 0
    return [placed[n] for n in range(len(messages))]


def consume_all(broker: LocalBroker, topic: str, expected: int) -> list:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    partitions = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=30).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions.partitions])
    messages = []
    deadline = time.monotonic() + 60
    while len(messages) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            messages.append(message)
    consumer.close()
    return messages


def kafka_args(broker: LocalBroker, topic: str, *extra: str) -> list[str]:
    """``--set`` options of a ``recsys stream`` reading ``topic``."""
    values = ["serving.stream.source=kafka", f"serving.stream.kafka.bootstrap_servers={broker.bootstrap_servers}",
              f"serving.stream.kafka.topic={topic}", "serving.stream.trigger_seconds=0.5",
              f"spark.jars_dir={JARS_DIR}", *extra]
    return [arg for value in values for arg in ("--set", value)]


def kafka_settings(root: Path, broker: LocalBroker, topic: str, *extra: str) -> Settings:
    return make_settings(root, *kafka_args(broker, topic, *extra)[1::2])


def event(user: int, item: int, ts_ms: int, behavior: str = "pv") -> str:
    return json.dumps({"user_id": user, "item_id": item, "behavior_type": behavior, "ts": ts_ms})


# --- configuration ---------------------------------------------------------------------------------


def test_kafka_source_options_come_from_config(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "broker.port=19999", "serving.stream.kafka.topic=clicks",
                             "serving.stream.kafka.max_offsets_per_trigger=500",
                             "serving.stream.kafka.options.kafka.security.protocol=SASL_SSL",
                             "serving.stream.kafka.options.minPartitions=4")
    assert kafka_options(settings) == {
        "kafka.bootstrap.servers": "127.0.0.1:19999",  # no servers given: the local broker
        "subscribe": "clicks", "startingOffsets": "earliest", "failOnDataLoss": "true",
        "maxOffsetsPerTrigger": "500", "kafka.security.protocol": "SASL_SSL", "minPartitions": "4",
    }
    cluster = make_settings(tmp_path, "serving.stream.kafka.bootstrap_servers=k1:9093,k2:9093")
    assert kafka_options(cluster)["kafka.bootstrap.servers"] == "k1:9093,k2:9093"
    from recsys_spark.errors import ConfigError

    for key in ("startingOffsets", "kafka.bootstrap.servers", "kafka.value.deserializer", "SUBSCRIBE"):
        with pytest.raises(ConfigError, match=r"serving\.stream\.kafka\.options"):
            make_settings(tmp_path, f"serving.stream.kafka.options.{key}=x")
    with pytest.raises(ConfigError, match=r"serving\.stream\.kafka\.topic"):
        make_settings(tmp_path, "serving.stream.kafka.topic=no spaces")


# --- the broker and the producer -------------------------------------------------------------------


@pytest.mark.kafka
def test_broker_up_and_down_are_idempotent_and_say_why_they_fail(broker, tmp_path, capsys) -> None:
    same = ["--set", f"broker.folder={broker.folder}", "--set", f"broker.port={broker.port}",
            "--set", f"broker.controller_port={broker.controller_port}", "--set", f"broker.jars_dir={KAFKA_JARS}",
            *QUIET]
    code, result, err = run_cli(capsys, "broker", "up", *same, "--json")
    assert code == 0, err
    assert result["action"] == "already running" and result["bootstrap_servers"] == broker.bootstrap_servers
    assert run_cli(capsys, "broker", "status", *same, "--json")[1]["running"] is True

    elsewhere = ["--set", f"broker.folder={tmp_path / 'other'}", "--set", f"broker.jars_dir={KAFKA_JARS}", *QUIET]
    code, result, _ = run_cli(capsys, "broker", "down", *elsewhere, "--json")
    assert code == 0 and result["action"] == "not running"
    with socket.socket() as taken:  # a port someone else listens on
        taken.bind(("127.0.0.1", free_port(FIRST_PORT + 100)))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "broker", "up", *elsewhere, "--set", f"broker.port={port}",
                               "--set", f"broker.controller_port={free_port(port + 1)}")
        assert code == 1 and f"port {port} on 127.0.0.1 is taken" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "broker", "up", "--set", f"broker.folder={tmp_path / 'third'}",
                           "--set", f"broker.jars_dir={tmp_path / 'no-jars'}", *QUIET)
    assert code == 1 and "make setup" in err
    with pytest.raises(BrokerError, match="taken"):  # the session's broker holds its ports
        LocalBroker(tmp_path / "fourth", broker.port, free_port(FIRST_PORT + 200), KAFKA_JARS).up()


@pytest.mark.kafka
def test_replay_keys_each_users_events_into_one_partition_in_order(broker, served, tmp_path, capsys) -> None:
    log = tmp_path / "log.jsonl"
    lines = served["stream_log"].read_text().splitlines()[:300]
    log.write_text("\n".join(lines) + "\n")
    topic = f"replayed-{uuid.uuid4().hex[:8]}"
    started = int(time.time() * 1000)
    code, result, err = run_cli(capsys, "replay", "--input", str(log), "--format", "jsonl", "--sink", "kafka",
                                "--topic", topic, "--bootstrap-servers", broker.bootstrap_servers,
                                "--partitions", "3", "--rate", "2000", "--json", *QUIET)
    assert code == 0, err
    assert (result["events"], result["messages"], result["partitions"]) == (300, 300, 3)
    ended = int(time.time() * 1000)
    messages = consume_all(broker, topic, 300)
    assert len(messages) == 300 and {m.partition() for m in messages} == {0, 1, 2}
    placed: dict[bytes | None, set[int]] = defaultdict(set)
    times: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for m in messages:
        placed[m.key()].add(m.partition())
        if m.key() is not None:
            value = json.loads(m.value())
            assert str(value["user_id"]).strip().encode() == m.key()
            if isinstance(value.get("ts"), int) and started <= value["ts"] <= ended:  # retimed on publishing
                times[m.key()].append((m.offset(), value["ts"]))
    assert all(len(partitions) == 1 for key, partitions in placed.items() if key is not None)
    assert sum(map(len, times.values())) > 250
    for key, seen in times.items():  # published in event-time order: offsets follow event time
        stamps = [ts for _, ts in sorted(seen)]
        assert stamps == sorted(stamps), key
    # lines without a readable user id go unkeyed (any partition)
    assert sum(m.key() is None for m in messages) == sum(not _has_user_id(line) for line in lines) > 0

    code, _, err = run_cli(capsys, "replay", "--input", str(log), "--format", "jsonl", "--sink", "kafka",
                           "--landing", str(tmp_path), "--rate", "10")
    assert code == 2 and "--landing is for --sink landing" in err


def _has_user_id(line: str) -> bool:
    try:
        return str(json.loads(line)["user_id"]).strip().isdigit()
    except (ValueError, KeyError, TypeError):
        return False


# --- the stream ------------------------------------------------------------------------------------


@pytest.mark.kafka
def test_kafka_micro_batches_do_what_the_file_source_does(spark, served, broker, tmp_path) -> None:
    """Validation, quarantine, bronze, user state, scores: the same tables from a topic as from
    landed files; malformed messages are quarantined with their topic/partition/offset, and a
    user's events that arrive out of order across micro-batches give the same state."""
    from recsys_spark.storage import open_lakehouse

    u1, u2, u3 = sorted(table(served["pristine"], "gold/user_sequences").column("user_id").to_pylist())[:3]
    now = int(time.time() * 1000)
    first = [(str(u1), event(u1, 5, now)), (str(u2), event(u2, 6, now)), (str(u1), event(u1, 7, now + 1000)),
             (str(u3), event(u3, 9, now + 2000, "buy")),  # u3's later event comes first...
             (None, b"\xff\xfe not UTF-8"), (None, "{not json"), (None, None),  # ...and three malformed
             ("3", '{"user_id": 3, "item_id": "x", "behavior_type": "pv", "ts": 1}')]  # ...and a wrong field
    second = [(str(u3), event(u3, 8, now)),  # ...its earlier one in a later micro-batch
              (str(u2), event(u2, 5, now + 3000, "cart")), (None, '{"user_id": 5}')]

    def files_run(root: Path) -> None:
        landing = tmp_path / "landing"
        landing.mkdir()
        settings = make_settings(root, f"serving.stream.landing={landing}", "serving.stream.trigger_seconds=0.5")
        query = start_stream(spark, open_lakehouse(spark, settings), settings)
        try:
            for number, phase in enumerate((first, second)):
                land(landing, [value if value is not None else "" for _, value in phase], f"{number}.jsonl")
                query.processAllAvailable()
        finally:
            query.stop()

    topic = new_topic(broker)
    placed: list[tuple[int, int]] = []

    def kafka_run(root: Path) -> None:
        settings = kafka_settings(root, broker, topic)
        query = start_stream(spark, open_lakehouse(spark, settings), settings)
        try:
            for phase in (first, second):
                placed.extend(produce(broker, topic, phase))
                query.processAllAvailable()
            assert query.isActive  # malformed messages never stop it
        finally:
            query.stop()

    from_files, from_kafka = tmp_path / "files", tmp_path / "kafka"
    for root, run in ((from_files, files_run), (from_kafka, kafka_run)):
        shutil.copytree(served["pristine"], root)
        run(root)
    expected, actual = snapshot(from_files), snapshot(from_kafka)
    for name in ("recommendations", "user_state", "quarantine"):
        assert actual[name] == expected[name], name
    streamed = [[json.loads(r) for r in rows["bronze"]] for rows in (expected, actual)]
    raws = [sorted(r["raw"] for r in rows if r["source_file"].startswith("kafka:") or "/landing/" in r["source_file"])
            for rows in streamed]
    assert raws[0] == raws[1] and len(raws[1]) == len(first) + len(second)

    sources = {f"kafka:{topic}/{p}/{o}" for p, o in placed}
    bronze = [r["source_file"] for r in table(from_kafka, "bronze/events_raw").to_pylist()
              if r["source_file"].startswith("kafka:")]
    assert sorted(bronze) == sorted(sources)  # every message once, named by its offset
    quarantined = {r["source_file"]: r["reason"] for r in table(from_kafka, "quarantine/events").to_pylist()
                   if r["source_file"].startswith("kafka:")}
    by_value = dict(zip([value for _, value in first + second], [f"kafka:{topic}/{p}/{o}" for p, o in placed],
                        strict=True))
    assert quarantined == {by_value[b"\xff\xfe not UTF-8"]: "invalid_encoding",
                           by_value["{not json"]: "malformed_json", by_value[None]: "malformed_json",
                           by_value['{"user_id": 3, "item_id": "x", "behavior_type": "pv", "ts": 1}']: "invalid_id",
                           by_value['{"user_id": 5}']: "missing_field"}
    state = {r["user_id"]: r for r in table(from_kafka, "serving/user_state").to_pylist()}
    assert state[u3]["item_ids"][-2:] == [8, 9] and 9 in state[u3]["bought"]  # in event-time order
    assert state[u1]["item_ids"][-2:] == [5, 7]
    nearline = {r["user_id"] for r in table(from_kafka, "serving/recommendations").to_pylist()
                if r["source"] == "nearline"}
    assert nearline == {u1, u2, u3}
    assert all(9 not in r["item_ids"] for r in table(from_kafka, "serving/recommendations").to_pylist()
               if r["user_id"] == u3 and r["source"] == "nearline")  # bought: never offered again


@pytest.mark.kafka
def test_kill_9_on_kafka_and_restart_equals_an_uninterrupted_run(served, broker, tmp_path, capsys) -> None:
    topic = new_topic(broker)
    replay(served["stream_log"], "jsonl", KafkaTopic(broker.bootstrap_servers, topic), rate=5000, limit=600)
    args = kafka_args(broker, topic, "serving.stream.kafka.max_offsets_per_trigger=100")
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    shutil.copytree(served["pristine"], reference)
    shutil.copytree(served["pristine"], interrupted)
    # The runs that are not killed run in this process's Spark session (one JVM start less each).
    stream = ["stream", "--format", "jsonl", "--until-idle", "4", *args, *QUIET]

    code, _, err = run_cli(capsys, *stream, "--root", str(reference))
    assert code == 0, err[-3000:]
    batches = len(table(reference, "ops/stream_metrics"))
    assert batches >= 6  # at most 100 messages per micro-batch

    process = stream_process(interrupted, *args)
    seed, committed = kill_9_mid_run(process, interrupted)
    assert 1 <= committed < batches, f"kill landed after {committed} batches (RECSYS_TEST_KILL_SEED={seed})"
    code, _, err = run_cli(capsys, *stream, "--root", str(interrupted))
    assert code == 0, err[-3000:]

    expected, actual = snapshot(reference), snapshot(interrupted)
    for name in expected:  # bronze included: each message's topic/partition/offset once
        assert actual[name] == expected[name], name
    sources = [json.loads(r)["source_file"] for r in actual["bronze"] if f"kafka:{topic}/" in r]
    assert len(sources) == len(set(sources)) == 600
    assert_lineage_consistent(reference, landed=600)
    assert_lineage_consistent(interrupted, landed=600)


@pytest.mark.kafka
def test_broker_outage_mid_run_loses_and_repeats_nothing(spark, served, broker, tmp_path, capsys) -> None:
    """The broker stops for 20 s while the query runs and events keep coming: the query rides
    through. A query started while it is down (short timeouts) fails with one line; restarted
    once the broker is back, it goes on from its checkpoint. Every message lands once."""
    from recsys_spark.storage import open_lakehouse

    topic = new_topic(broker)
    root = tmp_path / "lake"
    shutil.copytree(served["pristine"], root)
    lines = served["stream_log"].read_text().splitlines()
    for name, part in (("a", lines[:100]), ("b", lines[100:300]), ("c", lines[300:350])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    replay(tmp_path / "a.jsonl", "jsonl", KafkaTopic(broker.bootstrap_servers, topic), rate=5000)
    settings = kafka_settings(root, broker, topic)

    def streamed() -> list[str]:
        found = table(root, "bronze/events_raw").column("source_file").to_pylist()
        return [s for s in found if s.startswith(f"kafka:{topic}/")]

    query = start_stream(spark, open_lakehouse(spark, settings), settings)
    try:
        deadline = time.monotonic() + 240
        while not (root / "ops" / "stream_metrics").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        # 200 more events at 10/s, the broker away for 20 s of it: the producer holds and retries them
        during = KafkaTopic(broker.bootstrap_servers, topic)
        producing = threading.Thread(target=replay, args=(tmp_path / "b.jsonl", "jsonl", during),
                                     kwargs={"rate": 10})
        producing.start()
        while during.messages == 0 and producing.is_alive():
            time.sleep(0.05)
        broker.down()
        time.sleep(20)
        broker.up(timeout=240, follow_parent=True)
        producing.join(timeout=360)
        assert during.messages == 200
        deadline = time.monotonic() + 300  # the same query reads everything sent meanwhile
        while len(streamed()) < 300 and time.monotonic() < deadline:
            assert query.isActive, query.exception()
            time.sleep(1)
        query.processAllAvailable()
    finally:
        query.stop()
    assert len(streamed()) == 300

    stream = ["stream", "--root", str(root), "--format", "jsonl", "--until-idle", "4",
              *kafka_args(broker, topic), *QUIET]
    try:
        broker.down()
        short = ["kafka.default.api.timeout.ms=3000", "kafka.request.timeout.ms=3000", "fetchOffset.numRetries=1"]
        code, _, err = run_cli(capsys, *stream, *(arg for option in short
                                                  for arg in ("--set", f"serving.stream.kafka.options.{option}")))
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1, err[-3000:]
        assert f"no Kafka broker at {broker.bootstrap_servers} answered for topic '{topic}'" in errors[0]
    finally:
        broker.up(timeout=240, follow_parent=True)
    replay(tmp_path / "c.jsonl", "jsonl", KafkaTopic(broker.bootstrap_servers, topic), rate=5000)
    code, _, err = run_cli(capsys, *stream)
    assert code == 0, err[-3000:]
    assert len(streamed()) == len(set(streamed())) == 350  # each message exactly once
    assert_lineage_consistent(root, landed=350)


@pytest.mark.kafka
def test_lost_messages_stop_the_query_with_a_line_naming_the_topic(spark, served, broker, tmp_path) -> None:
    from recsys_spark.storage import open_lakehouse

    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    root = tmp_path / "lake"
    shutil.copytree(served["pristine"], root)
    user = table(root, "gold/user_sequences").column("user_id").to_pylist()[0]
    now = int(time.time() * 1000)
    messages = [(str(user), event(user, i, now + i)) for i in range(30)]

    # Retention removes messages the query has not read (delete_records moves the log start,
    # as retention does): a clear error; with fail_on_data_loss=false it skips them.
    aged = new_topic(broker)
    settings = kafka_settings(root, broker, aged, f"serving.stream.checkpoint={tmp_path / 'aged'}")
    produce(broker, aged, messages)
    lake = open_lakehouse(spark, settings)
    assert run_stream(spark, lake, settings, until_idle=3)["batches"] >= 1
    produce(broker, aged, messages)
    ends = admin.delete_records([TopicPartition(aged, p, OFFSET_END) for p in range(3)])
    for future in ends.values():
        future.result(timeout=30)
    with pytest.raises(StreamFailedError) as caught:
        run_stream(spark, lake, settings, until_idle=3)
    message = str(caught.value)
    assert f"Kafka topic '{aged}' at {broker.bootstrap_servers} no longer holds messages" in message
    assert "fail_on_data_loss" in message and "\n" not in message and "=== Streaming Query ===" not in message
    produce(broker, aged, messages[:5])
    skipping = kafka_settings(root, broker, aged, f"serving.stream.checkpoint={tmp_path / 'aged'}",
                              "serving.stream.kafka.fail_on_data_loss=false")
    run_stream(spark, lake, skipping, until_idle=3)
    read = [s for s in table(root, "bronze/events_raw").column("source_file").to_pylist() if f"{aged}/" in s]
    assert len(read) == 35  # the first 30, and the 5 sent after the gap

    # The topic deleted while the query reads it, then recreated: clear errors both times.
    gone = new_topic(broker)
    settings = kafka_settings(root, broker, gone, f"serving.stream.checkpoint={tmp_path / 'gone'}")
    produce(broker, gone, messages)
    query = start_stream(spark, lake, settings)
    try:
        query.processAllAvailable()
        admin.delete_topics([gone])[gone].result(timeout=30)
        with pytest.raises(StreamingQueryException):
            query.awaitTermination(120)
    finally:
        query.stop()
    gone_message = failure_message(" ".join(str(query.exception()).split()), settings)
    assert f"Kafka topic '{gone}' at {broker.bootstrap_servers}" in gone_message
    ensure_topic(broker.bootstrap_servers, gone, 3)
    produce(broker, gone, messages[:10])
    with pytest.raises(StreamFailedError, match=f"Kafka topic '{gone}' .* no longer holds messages"):
        run_stream(spark, lake, settings, until_idle=3)
