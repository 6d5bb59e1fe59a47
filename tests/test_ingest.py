"""Ingest through the CLI on local Spark: reconciliation, quarantine, idempotency, bad input."""

from __future__ import annotations

import json
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from recsys_spark.constants import (
    BRONZE_EVENTS_RAW,
    EVENT_DATE,
    EVENT_KEY,
    OPS_INGEST_RUNS,
    QUARANTINE_EVENTS,
    SILVER_EVENTS,
    SILVER_ITEM_INDEX,
    SILVER_USER_INDEX,
)
from recsys_spark.generate import GeneratorConfig, write_log
from recsys_spark.ingest.transforms import (
    TIEBREAK,
    drop_known,
    event_key,
    event_key_hash,
    first_occurrences,
    repeated_key_hashes,
)
from recsys_spark.storage import Lakehouse
from tests.conftest import run_cli, shared_file

pytestmark = [pytest.mark.spark, pytest.mark.integration]

QUIET = ("--set", "logging.level=WARNING")
SMALL = GeneratorConfig(users=300, items=200, days=3, seed=11)


@pytest.fixture(scope="module")
def taobao_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logs") / "events.csv"
    write_log(SMALL, path, fmt="taobao", malformed_rate=0.05)
    return path


def ingest(capsys, root: Path, fmt: str, path: Path) -> dict:
    code, result, err = run_cli(
        capsys, "ingest", "--format", fmt, "--input", str(path), "--root", str(root), "--json", *QUIET
    )
    assert code == 0, err
    assert result is not None
    return result


def assert_reconciles(report: dict) -> None:
    assert report["rows_in"] == (
        report["rows_clean"] + report["rows_quarantined"] + report["rows_duplicate"]
    )
    assert report["rows_quarantined"] == sum(report["quarantine_reasons"].values())


def test_taobao_every_row_lands_in_exactly_one_place(spark, lake: Lakehouse, settings, capsys, taobao_log) -> None:
    report = ingest(capsys, Path(settings.root), "taobao", taobao_log)
    assert_reconciles(report)
    lines = taobao_log.read_text().splitlines()
    assert report["rows_in"] == report["lines_in"] == len(lines)
    assert set(report["quarantine_reasons"]) == {
        "wrong_field_count", "missing_field", "invalid_id", "unknown_behavior",
        "timestamp_out_of_range",
    }
    assert report["rows_duplicate"] >= len(lines) - len(set(lines))  # exact copies at least

    silver = lake.read(SILVER_EVENTS)
    assert silver.count() == report["rows_clean"]
    assert silver.select(event_key()).distinct().count() == report["rows_clean"]
    quarantine = lake.read(QUARANTINE_EVENTS)
    assert quarantine.count() == report["rows_quarantined"]
    by_reason = {r.reason: r["count"] for r in quarantine.groupBy("reason").count().collect()}
    assert by_reason == report["quarantine_reasons"]
    sample = quarantine.first()
    assert sample.raw in lines and sample.source_file.endswith("events.csv")
    assert sample.ingest_run_id == report["run_id"] and sample.detail
    assert lake.read(BRONZE_EVENTS_RAW).count() == len(lines)

    # Typed, partitioned by date, with contiguous dense indices in stable dictionaries.
    types = dict(silver.dtypes)
    assert (types["user_id"], types["event_ts"], types["user_idx"]) == ("bigint", "timestamp", "int")
    assert DeltaTable(lake.path(SILVER_EVENTS)).metadata().partition_columns == ["event_date"]
    users = lake.read(SILVER_USER_INDEX)
    n_users = silver.select("user_id").distinct().count()
    assert users.count() == n_users
    assert sorted(r.user_idx for r in users.collect()) == list(range(n_users))
    items = lake.read(SILVER_ITEM_INDEX)
    assert items.agg(F.max("item_idx")).first()[0] == items.count() - 1


def test_same_content_twice_adds_nothing(spark, lake: Lakehouse, settings, capsys, taobao_log, tmp_path) -> None:
    root = Path(settings.root)
    first = ingest(capsys, root, "taobao", taobao_log)
    tables = (BRONZE_EVENTS_RAW, QUARANTINE_EVENTS, SILVER_EVENTS, SILVER_USER_INDEX)
    versions = {t: lake.version(t) for t in tables}
    again = ingest(capsys, root, "taobao", taobao_log)
    copy = tmp_path / "renamed.csv"
    shutil.copy(taobao_log, copy)
    renamed = ingest(capsys, root, "taobao", copy)
    for report in (again, renamed):
        assert report["status"] == "skipped"
        assert report["rows_in"] == report["rows_duplicate"] == first["rows_in"]
        assert report["rows_clean"] == report["rows_quarantined"] == 0
    assert {t: lake.version(t) for t in tables} == versions
    runs = lake.read(OPS_INGEST_RUNS).orderBy("attempt_started_at").collect()
    assert [r.status for r in runs] == ["succeeded", "skipped", "skipped"]
    assert runs[0].rows_clean == first["rows_clean"]


def test_overlap_counts_duplicates_and_dictionaries_only_grow(
    spark, lake: Lakehouse, settings, capsys, tmp_path
) -> None:
    root = Path(settings.root)
    day1 = tmp_path / "day1.csv"
    day1.write_text("10,100,1,pv,1511539200\n11,101,1,pv,1511539300\n12,102,2,buy,1511539400\n")
    ingest(capsys, root, "taobao", day1)
    before = {r.user_id: r.user_idx for r in lake.read(SILVER_USER_INDEX).collect()}
    day2 = tmp_path / "day2.csv"
    # one event already ingested, one duplicated inside the file, two new users and one new item
    day2.write_text(
        "11,101,1,pv,1511539300\n13,100,1,pv,1511539500\n13,100,1,pv,1511539500\n"
        "9,103,1,cart,1511539600\n"
    )
    report = ingest(capsys, root, "taobao", day2)
    assert (report["rows_in"], report["rows_clean"], report["rows_duplicate"]) == (4, 2, 2)
    assert (report["new_users"], report["new_items"]) == (2, 1)
    after = {r.user_id: r.user_idx for r in lake.read(SILVER_USER_INDEX).collect()}
    assert {k: after[k] for k in before} == before  # never renumbered
    assert sorted(after.values()) == list(range(5))
    assert {after[9], after[13]} == {3, 4}


def test_an_event_id_resent_on_another_date_is_a_duplicate(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    # An event_id is the key whatever the time: a source re-sending an event with a corrected
    # timestamp (another day) must not store it twice.
    root = Path(settings.root)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"event_id": "A", "user_id": 1, "item_id": 10, "behavior_type": "pv", "ts": 1700000000}\n')
    second.write_text('{"event_id": "A", "user_id": 1, "item_id": 10, "behavior_type": "pv", "ts": 1700500000}\n'
                      '{"event_id": "C", "user_id": 2, "item_id": 11, "behavior_type": "pv", "ts": 1700500100}\n')
    ingest(capsys, root, "jsonl", first)
    report = ingest(capsys, root, "jsonl", second)
    assert (report["rows_clean"], report["rows_duplicate"]) == (1, 1)
    assert sorted(r.event_id for r in lake.read(SILVER_EVENTS).collect()) == ["A", "C"]


def test_silver_created_with_the_key_column_keeps_getting_it(
    spark, lake: Lakehouse, settings, capsys, tmp_path
) -> None:
    root = Path(settings.root)
    day1, day2 = tmp_path / "day1.csv", tmp_path / "day2.csv"
    day1.write_text("10,100,1,pv,1511539200\n11,101,1,pv,1511539300\n")
    day2.write_text("11,101,1,pv,1511539300\n12,102,2,buy,1511539400\n")
    ingest(capsys, root, "taobao", day1)
    # the layout of silver tables written before the key string was dropped
    lake.write(lake.read(SILVER_EVENTS).withColumn(EVENT_KEY, event_key()), SILVER_EVENTS,
               mode="overwrite", partition_by=[EVENT_DATE])
    report = ingest(capsys, root, "taobao", day2)
    assert (report["rows_clean"], report["rows_duplicate"]) == (1, 1)
    rows = lake.read(SILVER_EVENTS).select(EVENT_KEY, event_key().alias("expected")).collect()
    assert len(rows) == 3 and all(r[EVENT_KEY] == r.expected for r in rows)


def test_jsonl_ingest(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    write_log(SMALL, path, fmt="jsonl", malformed_rate=0.05)
    report = ingest(capsys, Path(settings.root), "jsonl", path)
    assert_reconciles(report)
    assert {"malformed_json", "missing_field", "invalid_id", "unknown_behavior"} <= set(
        report["quarantine_reasons"]
    )
    silver = lake.read(SILVER_EVENTS)
    row = silver.filter(F.col("event_id").isNotNull()).select("*", event_key().alias("key")).first()
    assert row.key == f"e:{row.event_id}"
    assert row.extras["device"] in {"ios", "android", "web"}
    assert silver.count() == report["rows_clean"]


def test_sequences_ingest(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    path = tmp_path / "seq.txt"
    path.write_text("1 5 6 7 5\n2 6 7\n3\n4 5 x 9\n")
    report = ingest(capsys, Path(settings.root), "sequences", path)
    assert_reconciles(report)
    # 4 + 2 items, one line without items, one bad token; "4 5 x 9" keeps 5 and 9
    assert (report["rows_in"], report["rows_clean"], report["rows_quarantined"]) == (10, 8, 2)
    assert report["lines_in"] == 4
    user1 = lake.read(SILVER_EVENTS).filter("user_id = 1").orderBy("event_ts").collect()
    assert [r.item_id for r in user1] == [5, 6, 7, 5]
    assert {r.behavior_type for r in user1} == {"buy"}


def test_a_sequences_user_continues_across_lines_and_ingests(spark, lake: Lakehouse, settings, capsys,
                                                             tmp_path) -> None:
    """A user on two lines, or again in a later file, continues their sequence: times never
    restart at the base time (items would interleave, and the same position on two lines
    would pass for a duplicate)."""
    first = tmp_path / "a.txt"
    first.write_text("1 10 11\n2 20\n1 10 12\n")  # user 1 twice; item 10 at position 0 of both lines
    report = ingest(capsys, Path(settings.root), "sequences", first)
    assert (report["rows_in"], report["rows_clean"], report["rows_duplicate"]) == (5, 5, 0)
    later = tmp_path / "b.txt"
    later.write_text("1 13\n3 30\n")
    ingest(capsys, Path(settings.root), "sequences", later)
    step = settings.ingest.sequence_step_seconds
    base = settings.ingest.sequence_base_time.timestamp()
    events = lake.read(SILVER_EVENTS).select("user_id", "item_id", F.unix_seconds("event_ts").alias("t")).collect()
    by_user: dict[int, list[tuple[float, int]]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(((e.t - base) / step, e.item_id))
    assert sorted(by_user[1]) == [(0, 10), (1, 11), (2, 10), (3, 12), (4, 13)]
    assert sorted(by_user[2]) == [(0, 20)] and sorted(by_user[3]) == [(0, 30)]


def test_an_appended_log_reads_only_its_new_lines(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    """Ingested, appended to and ingested again: old lines are neither quarantined again nor
    landed in bronze again, and the counts describe the lakehouse, not only the run."""
    log = tmp_path / "today.csv"
    log.write_text("10,100,1,pv,1511539200\nnot,a,line\n")
    root = Path(settings.root)
    first = ingest(capsys, root, "taobao", log)
    with log.open("a") as handle:
        handle.write("11,101,1,pv,1511539300\nstill,not,a,line\n")
    second = ingest(capsys, root, "taobao", log)
    assert_reconciles(second)
    assert (second["rows_in"], second["rows_clean"], second["rows_quarantined"], second["rows_duplicate"]) == \
        (2, 1, 1, 0)
    assert (first["rows_in"] + second["rows_in"]) == lake.read(SILVER_EVENTS).count() + lake.read(
        QUARANTINE_EVENTS).count() == 4
    assert lake.read(BRONZE_EVENTS_RAW).count() == 4
    entry = second["files"][0]
    assert (entry["offset"], entry["rows_total"]) == (len("10,100,1,pv,1511539200\nnot,a,line\n"), 4)
    # the whole file again is the same content: skipped, all four rows duplicates
    again = ingest(capsys, root, "taobao", log)
    assert again["status"] == "skipped" and again["rows_duplicate"] == 4


def test_an_edited_log_does_not_quarantine_its_old_bad_lines_again(spark, lake: Lakehouse, settings, capsys,
                                                                   tmp_path) -> None:
    log = tmp_path / "today.csv"
    log.write_text("10,100,1,pv,1511539200\nnot,a,line\n")
    root = Path(settings.root)
    ingest(capsys, root, "taobao", log)
    log.write_text("12,102,1,pv,1511539400\n10,100,1,pv,1511539200\nnot,a,line\n")  # a line put in front
    report = ingest(capsys, root, "taobao", log)
    assert_reconciles(report)
    assert (report["rows_in"], report["rows_clean"], report["rows_quarantined"], report["rows_duplicate"]) == \
        (3, 1, 0, 2)
    assert lake.read(QUARANTINE_EVENTS).count() == 1


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        (None, "taobao", "input not found"),
        ("", "taobao", "input is empty"),
        ('{"user_id": 1, "item_id": 2}\n{"user_id": 3}\n', "taobao", "nothing in .* parses as taobao"),
        ("1,2,3,pv,1511539200\n", "jsonl", "nothing in .* parses as jsonl"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(
    spark, settings, capsys, tmp_path, content: str | None, fmt: str, message: str
) -> None:
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_text(content)
    code, _, err = run_cli(capsys, "ingest", "--format", fmt, "--input", str(path),
                           "--root", settings.root, *QUIET)
    assert code != 0
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert pytest.importorskip("re").search(message, error_lines[0])
    lake_root = Path(settings.root)
    assert not any((lake_root / layer).exists() for layer in ("bronze", "silver", "quarantine", "ops"))
    # and what the failed run left (its scratch folder) is no lakehouse for the other commands
    code, _, err = run_cli(capsys, "tables", "--root", settings.root, *QUIET)
    assert code == 1 and err.strip().endswith("or run `recsys ingest` first")


@pytest.mark.parametrize(
    ("fmt", "good", "bad"),
    [
        ("taobao", b"1,2,3,pv,1511539200", b"4,5,6,p\xe9v,1511539201"),
        ("jsonl",
         '{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200,"city":"Z\u00fcrich"}'.encode(),
         b'{"user_id":4,"item_id":5,"behavior_type":"pv","ts":1511539201,"city":"Z\xfcrich"}'),
        ("sequences", b"1 2 3", b"4 5\xff 6"),
    ],
)
def test_line_that_is_not_utf8_is_quarantined_with_its_bytes(
    spark, lake: Lakehouse, settings, capsys, tmp_path, fmt: str, good: bytes, bad: bytes
) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(good + b"\n" + bad + b"\n")
    report = ingest(capsys, Path(settings.root), fmt, path)
    assert_reconciles(report)
    assert report["quarantine_reasons"] == {"invalid_encoding": report["rows_quarantined"]}
    assert report["rows_quarantined"] >= 1 and report["rows_clean"] >= 1

    # Every table stays readable by delta-rs (Arrow insists on UTF-8); the exact bytes are kept.
    quarantine = DeltaTable(lake.path(QUARANTINE_EVENTS)).to_pyarrow_table().to_pylist()
    assert {row["raw"] for row in quarantine} == {bad.decode("utf-8", "replace")}
    assert {row["detail"] for row in quarantine} == {f"not UTF-8; bytes (hex): {bad.hex().upper()}"}
    bronze = DeltaTable(lake.path(BRONZE_EVENTS_RAW)).to_pyarrow_table().column("raw").to_pylist()
    assert sorted(bronze) == sorted([good.decode(), bad.decode("utf-8", "replace")])
    if fmt == "jsonl":  # non-ASCII that is valid UTF-8 is data, not an error
        extras = lake.read(SILVER_EVENTS).first().extras
        assert extras == {"city": "Z\u00fcrich"}


GOOD_TAOBAO = [f"{u},{u + 100},1,pv,{1511539200 + u}".encode() for u in range(1, 6)]


def test_a_line_of_a_few_kb_is_quarantined_and_the_file_stays_ingestible(
    spark, lake: Lakehouse, settings, capsys, tmp_path
) -> None:
    # Spark's Parquet writer drops the statistics of such values: the commit crashed on them,
    # after bronze was committed, so every rerun failed the same way.
    path = tmp_path / "events.csv"
    path.write_bytes(b"\n".join([*GOOD_TAOBAO, b"9" * 2100]) + b"\n")
    report = ingest(capsys, Path(settings.root), "taobao", path)
    assert_reconciles(report)
    assert (report["rows_clean"], report["quarantine_reasons"]) == (5, {"wrong_field_count": 1})
    assert ingest(capsys, Path(settings.root), "taobao", path)["status"] == "skipped"
    bronze = DeltaTable(lake.path(BRONZE_EVENTS_RAW))
    assert bronze.to_pyarrow_table(filters=[("raw", "=", "9" * 2100)]).num_rows == 1


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_lines_over_the_limit_are_quarantined_with_their_length_and_first_bytes(
    spark, lake: Lakehouse, settings, capsys, tmp_path, suffix: str
) -> None:
    import gzip

    long_crlf = b"1,2,3,pv," + b"7" * 5000  # ends in \r\n, as in a Windows file
    long_last = b"\xff" + b"8" * 9000  # not UTF-8, and no newline at the end of the file
    content = b"\n".join(GOOD_TAOBAO[:3]) + b"\n" + long_crlf + b"\r\n" + GOOD_TAOBAO[3] + b"\r" + long_last
    path = tmp_path / f"events{suffix}"
    path.write_bytes(gzip.compress(content) if suffix.endswith(".gz") else content)
    code, report, err = run_cli(capsys, "ingest", "--format", "taobao", "--input", str(path), "--root",
                                settings.root, "--json", "--set", "ingest.max_line_bytes=4096", *QUIET)
    assert code == 0, err
    assert_reconciles(report)
    assert (report["rows_in"], report["lines_in"], report["rows_clean"]) == (6, 6, 4)
    assert report["quarantine_reasons"] == {"line_too_long": 2}
    rows = {r["detail"]: r for r in DeltaTable(lake.path(QUARANTINE_EVENTS)).to_pyarrow_table().to_pylist()}
    first_bytes = "; first bytes: "
    assert sorted(d.split(first_bytes)[0] for d in rows) == [
        "line of 5009 bytes, over ingest.max_line_bytes=4096",
        "line of 9001 bytes, over ingest.max_line_bytes=4096",
    ]
    heads = sorted(r["raw"] for r in rows.values())
    assert heads == sorted([long_crlf[:256].decode(), long_last[:256].decode("utf-8", "replace")])
    assert all(r["source_file"] == str(path) for r in rows.values())
    bronze = DeltaTable(lake.path(BRONZE_EVENTS_RAW)).to_pyarrow_table().column("raw").to_pylist()
    assert sorted(bronze) == sorted([g.decode() for g in GOOD_TAOBAO[:4]] + heads)


def test_a_huge_line_without_newline_is_never_read_whole(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    # 200 MB on one line: the JVM (2 GB heap here) ran out of memory reading it as one string.
    path = tmp_path / "huge.csv"
    with path.open("wb") as out:
        out.write(b"\n".join(GOOD_TAOBAO) + b"\n")
        for _ in range(200):
            out.write(b"x" * (1 << 20))
    report = ingest(capsys, Path(settings.root), "taobao", path)
    assert_reconciles(report)
    assert (report["rows_clean"], report["quarantine_reasons"]) == (5, {"line_too_long": 1})
    (detail,) = [r["detail"] for r in DeltaTable(lake.path(QUARANTINE_EVENTS)).to_pyarrow_table().to_pylist()]
    assert detail == f"line of {200 << 20} bytes, over ingest.max_line_bytes=1048576; first bytes: " + "x" * 256


def _hostile_line(rng: random.Random, fmt: str) -> bytes:
    """One line an attacker or a broken exporter might send (seeded, so a failure repeats)."""
    kind = rng.randrange(7)
    if kind == 0:  # random bytes, any length up to a few KB (newlines in them split the line)
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 300, 5000])))
    if kind == 1:  # nesting far past any parser's depth limit
        depth = rng.choice([10, 1000, 10_000])
        return (b'{"a":' * depth + b"1" + b"}" * depth) if rng.random() < 0.5 else b"[" * depth + b"]" * depth
    if kind == 2:  # NUL bytes inside an otherwise good line
        return b"1\x00,2,3,pv,1511539200" if fmt == "taobao" else b'{"user_id": "1\x00", "item_id": 2}'
    if kind == 3:  # every field very long
        field = "9" * rng.choice([100, 3000, 20_000])
        if fmt == "jsonl":
            return json.dumps({"event_id": field, "user_id": field, "item_id": 2, "behavior_type": field,
                               "ts": field, "category_id": field, field: field}).encode()
        return ",".join([field] * 5).encode() if fmt == "taobao" else " ".join([field] * 50).encode()
    if kind == 4:  # a line over ingest.max_line_bytes (64 KiB here), up to 3 MB
        return bytes([rng.choice(b"0123456789,{} ")]) * rng.choice([70_000, 3_000_000])
    if kind == 5:  # plausible text in the wrong shape
        return rng.choice([b"}", b"{}", b"{]", b"1,2", b",,,,", b"  ", b'"', b"\xef\xbb\xbf1,2,3,pv,1"])
    return GOOD_TAOBAO[rng.randrange(5)]  # good lines mixed in


@pytest.mark.parametrize("fmt", ["taobao", "jsonl", "sequences"])
def test_hostile_lines_end_in_silver_quarantine_or_duplicates_never_a_crash(
    spark, lake: Lakehouse, settings, capsys, tmp_path, fmt: str
) -> None:
    rng = random.Random(f"hostile-{fmt}-1")
    path = tmp_path / "hostile.txt"
    path.write_bytes(b"\n".join(_hostile_line(rng, fmt) for _ in range(120)) + b"\n")
    code, report, err = run_cli(capsys, "ingest", "--format", fmt, "--input", str(path), "--root",
                                settings.root, "--json", "--set", "ingest.max_line_bytes=65536", *QUIET)
    if code != 0:  # nothing parsed: one clear line and nothing written
        assert len([x for x in err.splitlines() if x.startswith("error:")]) == 1, err[-3000:]
        assert "Traceback" not in err
        assert not any((Path(settings.root) / layer).exists() for layer in ("bronze", "silver", "quarantine"))
        return
    assert_reconciles(report)
    assert report["quarantine_reasons"].get("line_too_long", 0) >= 1
    assert lake.read(BRONZE_EVENTS_RAW).count() == report["lines_in"]
    assert lake.read(QUARANTINE_EVENTS).count() == report["rows_quarantined"]
    assert lake.read(SILVER_EVENTS).count() == report["rows_clean"]
    if fmt != "sequences":  # one row per line
        assert report["rows_in"] == report["lines_in"]


@pytest.mark.parametrize("name", ["log[2].csv", "x{1,2}.csv", "a*b?.csv", "back\\slash.csv"])
def test_file_names_are_literal_not_glob_patterns(spark, lake: Lakehouse, settings, capsys, tmp_path, name) -> None:
    # Spark expands glob characters in paths: "log[2].csv" would read log2.csv instead.
    for decoy in ("log2.csv", "x1.csv", "x2.csv", "ab.csv", "axbc.csv", "back.csv"):
        (tmp_path / decoy).write_text("9,9,9,pv,1511539200\n")
    (tmp_path / name).write_text("1,2,3,pv,1511539200\n")
    report = ingest(capsys, Path(settings.root), "taobao", tmp_path / name)
    assert (report["rows_in"], report["lines_in"], report["rows_clean"]) == (1, 1, 1)
    assert [(r.user_id, r.source_file) for r in lake.read(SILVER_EVENTS).collect()] == [
        (1, str(tmp_path / name))
    ]


def test_compressed_input_is_read_by_its_extension(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    import bz2
    import gzip
    import lzma

    content = b"1,2,3,pv,1511539200\n4,5,6,buy,1511539201\n"
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(content))
    (tmp_path / "b.csv.bz2").write_bytes(bz2.compress(content.replace(b"pv", b"cart").replace(b"buy", b"fav")))
    report = ingest(capsys, Path(settings.root), "taobao", tmp_path)
    assert (report["rows_in"], report["rows_clean"]) == (4, 4)

    xz = tmp_path / "xz" / "c.csv.xz"  # a codec Hadoop does not read: bytes, not text
    xz.parent.mkdir()
    xz.write_bytes(lzma.compress(content))
    code, _, err = run_cli(capsys, "ingest", "--format", "taobao", "--input", str(xz),
                           "--root", settings.root, *QUIET)
    assert code != 0
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "invalid_encoding" in line and "is it text?" in line


def test_file_name_with_a_colon_is_read(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    # Hadoop's checksum layer cannot open "events-10:00.csv"; the session reads local files raw.
    (tmp_path / "events-10:00.csv").write_text("1,2,3,pv,1511539200\n")
    report = ingest(capsys, Path(settings.root), "taobao", tmp_path)
    assert (report["rows_in"], report["rows_clean"]) == (1, 1)
    assert lake.read(SILVER_EVENTS).first().source_file.endswith("events-10:00.csv")


@pytest.mark.parametrize("as_uri", [False, True], ids=["local", "uri"])
def test_folder_is_read_with_its_subfolders(
    spark, lake: Lakehouse, settings, capsys, tmp_path, as_uri: bool
) -> None:
    # Date-partitioned drops ("day=2017-11-25/part-0.csv") are common; hidden and "_" entries
    # (temporary files, _SUCCESS markers, .staging folders) are not input. A URI (hdfs://,
    # s3a://; here file://) is listed through Hadoop's file system instead of the local one.
    # The lakehouse (settings.root is tmp_path/lake) lies inside the folder and is not input.
    assert Path(settings.root).parent == tmp_path
    files = {
        "top.csv": "1,2,3,pv,1511539200\n",
        "day=1/a.csv": "4,5,6,pv,1511539201\n",
        "day=2/deeper/b.csv": "7,8,9,buy,1511539202\n",
        "day=2/.b.csv.tmp": "0,0,0,pv,1511539203\n",
        ".staging/c.csv": "0,0,0,pv,1511539204\n",
        "_temporary/d.csv": "0,0,0,pv,1511539205\n",
        "day=1/_SUCCESS": "",
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    source = tmp_path.as_uri() if as_uri else tmp_path
    report = ingest(capsys, Path(settings.root), "taobao", source)
    assert (report["rows_in"], report["rows_clean"]) == (3, 3)
    expected = [str(tmp_path / n) for n in ("day=1/a.csv", "day=2/deeper/b.csv", "top.csv")]
    if as_uri:
        expected = [f"file:{name}" for name in expected]  # Hadoop's spelling of a local URI
    assert sorted(r.source_file for r in lake.read(SILVER_EVENTS).collect()) == expected
    again = ingest(capsys, Path(settings.root), "taobao", source)
    assert (again["status"], again["rows_duplicate"]) == ("skipped", 3)


def test_a_damaged_silver_log_is_one_error_line_and_tables_lists_the_rest(
    spark, lake: Lakehouse, settings, capsys, tmp_path
) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(b"\n".join(GOOD_TAOBAO) + b"\n")
    ingest(capsys, Path(settings.root), "taobao", path)
    log = sorted((Path(lake.path(SILVER_EVENTS)) / "_delta_log").glob("*.json"))[-1]
    log.write_bytes(log.read_bytes()[: log.stat().st_size // 2])
    for command in ("features", "tables"):
        code, _, err = run_cli(capsys, command, "--root", settings.root, *QUIET)
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: table ") and "silver/events" in lines[0]
        assert f"v{int(log.stem)}" in lines[0] and "damaged" in lines[0]
    from recsys_spark.cli import main

    assert main(["tables", "--root", settings.root, *QUIET]) == 1
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert listed["silver/events"] == "unreadable" and listed[BRONZE_EVENTS_RAW].startswith("v")
    assert main(["tables", "--root", settings.root, "--json", *QUIET]) == 1
    error = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert error["exit_code"] == 1 and "silver/events" in error["error"]


def test_links_are_followed_only_inside_the_input_folder(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("66,66,6,pv,1511539200\n")
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.csv").write_text("1,2,3,pv,1511539200\n")
    (folder / "passwd").symlink_to("/etc/passwd")
    (folder / "elsewhere").symlink_to(outside)
    (folder / "secret.csv").symlink_to(outside / "secret.csv")
    (folder / "again.csv").symlink_to(folder / "sub" / "a.csv")  # inside: the same file, read once
    (folder / "sub2").symlink_to(folder / "sub")
    report = ingest(capsys, Path(settings.root), "taobao", folder)
    assert (report["rows_in"], report["rows_clean"], report["rows_quarantined"]) == (1, 1, 0)
    assert [f["path"] for f in report["files"]] == [str(folder / "sub" / "a.csv")]
    assert lake.read(BRONZE_EVENTS_RAW).count() == 1


def test_many_files_are_read_together_and_keep_their_names(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    # More files than _FILES_READ_ONE_BY_ONE go through one Spark read; every row must still
    # name its own file, spelled as given, whatever characters the name holds.
    drop = tmp_path / "drop"
    names = [f"h{i:02d}.csv" for i in range(20)] + ["a b.csv", "c[1].csv", "ü.csv", "d:e.csv", "50%.csv", "#x.csv"]
    for i, name in enumerate(names):
        (drop / f"day={i % 3}").mkdir(parents=True, exist_ok=True)
        (drop / f"day={i % 3}" / name).write_text(f"{i},{i},1,pv,{1511539200 + i}\n{i},{i},1,buy,{1511539300 + i}\n")
    report = ingest(capsys, Path(settings.root), "taobao", drop)
    assert (report["rows_in"], report["rows_clean"]) == (2 * len(names), 2 * len(names))
    assert all(f["rows_in"] == 2 for f in report["files"])
    got = {(r.user_id, r.source_file) for r in lake.read(SILVER_EVENTS).collect()}
    assert got == {(i, str(drop / f"day={i % 3}" / name)) for i, name in enumerate(names)}


def test_maintain_takes_names_anywhere_and_checks_them_all_first(
    spark, lake: Lakehouse, settings, capsys, taobao_log
) -> None:
    ingest(capsys, Path(settings.root), "taobao", taobao_log)
    before = lake.version(SILVER_EVENTS)
    code, _, err = run_cli(capsys, "maintain", SILVER_EVENTS, "--optimize", "gold/none", "--root", settings.root,
                           *QUIET)
    assert code == 1 and "no table gold/none" in err
    assert lake.version(SILVER_EVENTS) == before  # nothing done before the mistake was found
    code, result, err = run_cli(capsys, "maintain", SILVER_EVENTS, "--optimize", SILVER_USER_INDEX, "--json",
                                "--root", settings.root, *QUIET)
    assert code == 0, err
    assert set(result["tables"]) == {SILVER_EVENTS, SILVER_USER_INDEX}


def test_wrong_format_is_refused_by_the_cli(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "ingest", "--format", "csv", "--input", str(tmp_path))
    assert exit_info.value.code == 2
    assert "invalid choice: 'csv'" in capsys.readouterr().err


def crashed_ingest(capsys, monkeypatch, settings, fmt: str, path: Path, *, crash_before: str) -> None:
    """An ingest that dies as it is about to write ``crash_before``."""
    real_write = Lakehouse.write

    def crash(self, df, table, **kwargs):
        if table == crash_before:
            raise RuntimeError(f"simulated crash before writing {table}")
        return real_write(self, df, table, **kwargs)

    monkeypatch.setattr(Lakehouse, "write", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(capsys, "ingest", "--format", fmt, "--input", str(path), "--root", settings.root, *QUIET)
    monkeypatch.setattr(Lakehouse, "write", real_write)


def test_crash_between_tables_resumes_without_duplicates(
    spark, lake: Lakehouse, settings, capsys, taobao_log, monkeypatch
) -> None:
    crashed_ingest(capsys, monkeypatch, settings, "taobao", taobao_log, crash_before=SILVER_EVENTS)
    assert lake.exists(BRONZE_EVENTS_RAW) and not lake.exists(SILVER_EVENTS)

    report = ingest(capsys, Path(settings.root), "taobao", taobao_log)
    assert_reconciles(report)
    lines = len(taobao_log.read_text().splitlines())
    assert lake.read(BRONZE_EVENTS_RAW).count() == lines  # bronze was not written twice
    assert lake.read(QUARANTINE_EVENTS).count() == report["rows_quarantined"]
    assert lake.read(SILVER_EVENTS).count() == report["rows_clean"]
    assert report["rows_clean"] > 0.9 * lines


def test_crash_before_the_run_record_changes_neither_features_nor_counts(
    spark, lake: Lakehouse, settings, capsys, tmp_path, monkeypatch
) -> None:
    # Silver is committed, the ops/ingest_runs record (written last) is not.
    seqs = tmp_path / "seq.txt"
    seqs.write_text("".join(f"{u} " + " ".join(str(u * 7 % 13 + k) for k in range(6)) + "\n" for u in range(1, 30)))
    crashed_ingest(capsys, monkeypatch, settings, "sequences", seqs, crash_before=OPS_INGEST_RUNS)
    assert lake.exists(SILVER_EVENTS) and not lake.exists(OPS_INGEST_RUNS)
    # the silver version is what it is: split as sequences are, record or not
    code, features, err = run_cli(capsys, "features", "--root", settings.root, "--json", *QUIET)
    assert code == 0, err
    assert features["protocol"] == "leave-one-out"
    # the re-run finds everything committed and still reports what the run added
    report = ingest(capsys, Path(settings.root), "sequences", seqs)
    assert_reconciles(report)
    assert report["new_users"] == 29 and report["new_items"] == lake.read("silver/item_index").count()


@pytest.mark.slow
def test_real_taobao_slice(spark, lake: Lakehouse, settings, capsys) -> None:
    path = shared_file("taobao_user_behavior_1h.csv")
    report = ingest(capsys, Path(settings.root), "taobao", path)
    assert_reconciles(report)
    assert report["rows_in"] == 110_300
    assert report["rows_clean"] > 109_000
    counts = {r.behavior_type: r["count"] for r in lake.read(SILVER_EVENTS).groupBy("behavior_type").count().collect()}
    assert counts["pv"] > 90_000 and counts["buy"] > 2_000


@pytest.mark.slow
def test_real_amazon_toys_sequences(spark, lake: Lakehouse, settings, capsys) -> None:
    path = shared_file("amazon_toys_sequences.txt")
    report = ingest(capsys, Path(settings.root), "sequences", path)
    assert_reconciles(report)
    assert report["lines_in"] == 19_412
    assert report["rows_quarantined"] == 0
    assert 160_000 < report["rows_clean"] <= report["rows_in"]


def test_duplicate_detection_uses_the_key_not_only_its_hash(spark) -> None:
    at = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)  # 1714564800 s
    rows = [  # (event_id, user, item, behaviour, ts, tiebreak, file)
        (None, 1, 10, "pv", at, 5, "a.csv"),
        (None, 1, 10, "pv", at, 3, "b.csv"),  # same natural key: wins on the smaller tiebreak
        (None, 1, 10, "buy", at, 1, "a.csv"),  # differs in behaviour only
        ("x7", 1, 10, "pv", at, 9, "a.csv"),  # an event id is the key, whatever the fields say
        ("x7", 2, 11, "cart", at, 8, "b.csv"),
        ("x8", 2, 11, "cart", at, 7, "b.csv"),
    ]
    events = spark.createDataFrame(
        rows, f"event_id string, user_id long, item_id long, behavior_type string, event_ts timestamp, "
              f"{TIEBREAK} long, source_file string")
    pairs = {(r.key, r.hash) for r in events.select(event_key().alias("key"), event_key_hash().alias("hash")).collect()}
    assert len(pairs) == 4  # four keys, each with one hash
    assert len({h for _, h in pairs}) == 4  # and no two of them share it

    repeated = repeated_key_hashes(events)
    assert repeated.count() == 2
    kept = first_occurrences(events, repeated).select(event_key().alias("key"), TIEBREAK).collect()
    assert sorted((r.key, r[TIEBREAK]) for r in kept) == sorted(
        [("1:10:pv:1714564800000000", 3), ("1:10:buy:1714564800000000", 1), ("e:x7", 8), ("e:x8", 7)])

    # A hash shared by different keys (a collision, forced here by marking every hash repeated)
    # must not merge them: ranking is by the key itself.
    everything = events.select(event_key_hash().alias("_key_hash")).distinct()
    assert first_occurrences(events, everything).count() == 4


def test_known_events_are_recognised_by_their_key(spark) -> None:
    at, later = datetime(2024, 5, 1, 12, tzinfo=UTC), datetime(2024, 5, 2, tzinfo=UTC)
    schema = "event_id string, user_id long, item_id long, behavior_type string, event_ts timestamp"
    known = spark.createDataFrame(
        [(None, 1, 10, "pv", at), ("x7", 5, 5, "pv", later), ("x9", 2, 11, "cart", at)], schema)
    events = spark.createDataFrame(
        [
            (None, 1, 10, "pv", at),  # known: same natural key
            (None, 1, 10, "buy", at),  # differs in behaviour only
            (None, 1, 10, "pv", later),  # differs in time only
            ("x7", 2, 11, "cart", at),  # known: an event id is the key, whatever the fields say
            (None, 2, 11, "cart", at),  # the known event with these fields has an id, this one not
            ("x8", 1, 10, "pv", at),  # an id never equals a natural key
        ],
        schema,
    )
    kept = drop_known(events, known).select(event_key().alias("key")).collect()
    assert sorted(r.key for r in kept) == sorted(
        ["1:10:buy:1714564800000000", "1:10:pv:1714608000000000", "2:11:cart:1714564800000000", "e:x8"])
    assert drop_known(events, None).count() == 6
