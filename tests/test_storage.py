from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from recsys_spark.errors import (
    EngineUnavailableError,
    SchemaMismatchError,
    TableNotFoundError,
    TableUnreadableError,
)
from recsys_spark.spark import delta_spark_loaded
from recsys_spark.storage import Idempotency, Lakehouse, resolve_engine
from tests.conftest import ENGINES, HAVE_DELTA_JARS, NO_DELTA_JARS

pytestmark = pytest.mark.spark


@pytest.fixture(params=ENGINES)
def lake(request, spark, settings) -> Lakehouse:
    """The storage contract, on each engine."""
    return Lakehouse(settings.root, resolve_engine(spark, request.param))


@pytest.fixture
def rs_lake(spark, settings) -> Lakehouse:
    """For tests of the delta-rs engine's own mechanics (statistics, staging, its errors)."""
    return Lakehouse(settings.root, resolve_engine(spark, "delta-rs"))

BASE = 1_511_539_200


def events(spark, n: int = 100, *, offset: int = 0):
    """n rows over 3 days; times carry sub-millisecond parts to exercise stats rounding."""
    return spark.range(offset, offset + n).select(
        F.col("id").alias("k"),
        (F.col("id") % 7).cast("int").alias("v"),
        F.timestamp_micros(F.lit(BASE * 1_000_000) + F.col("id") * 2_600_000_123).alias("ts"),
        F.to_date(F.timestamp_micros(F.lit(BASE * 1_000_000) + F.col("id") * 2_600_000_123)).alias("day"),
    )


def table_files(path: str) -> set[str]:
    return {
        str(p.relative_to(path))
        for p in Path(path).rglob("*.parquet")
        if "_delta_log" not in p.parts and "_staging" not in p.parts
    }


def test_write_read_roundtrip_is_a_genuine_delta_table(spark, lake: Lakehouse) -> None:
    result = lake.write(events(spark), "silver/t", partition_by=["day"])
    assert (result.version, result.rows_written) == (0, 100)
    back = lake.read("silver/t")
    assert back.columns == ["k", "v", "ts", "day"]
    assert sorted(r.k for r in back.select("k").collect()) == list(range(100))
    # delta-rs itself (no Spark) reads the same rows, partition column included.
    table = DeltaTable(lake.path("silver/t"))
    assert table.metadata().partition_columns == ["day"]
    arrow = table.to_pyarrow_table()
    assert arrow.num_rows == 100
    spark_days = {r.day for r in back.select("day").distinct().collect()}
    assert set(arrow.column("day").to_pylist()) == spark_days


def test_root_with_glob_characters_is_taken_literally(spark, tmp_path: Path) -> None:
    lake = Lakehouse(str(tmp_path / "lake[1]"), resolve_engine(spark, "delta-rs"))
    lake.write(events(spark, 10), "silver/t", partition_by=["day"])
    assert sorted(r.k for r in lake.read("silver/t").collect()) == list(range(10))
    with lake.scratch("x") as scratch:
        assert scratch.put(events(spark, 5), "part").count() == 5


def test_file_statistics_bound_every_file(spark, rs_lake: Lakehouse) -> None:
    """Readers skip files by these min/max values: they must enclose each file's true range."""
    rs_lake.write(events(spark, 300), "silver/t", partition_by=["day"])
    path = rs_lake.path("silver/t")
    actions = pa.table(DeltaTable(path).get_add_actions(flatten=True)).to_pylist()
    assert sum(a["num_records"] for a in actions) == 300
    for action in actions:
        data = pq.read_table(os.path.join(path, unquote(action["path"])))
        assert action["num_records"] == data.num_rows
        for column in ("k", "ts"):
            values = data.column(column).to_pylist()
            assert action[f"min.{column}"] <= min(values)
            assert action[f"max.{column}"] >= max(values)
            assert action[f"null_count.{column}"] == 0


def test_later_appends_may_carry_nulls(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 10), "silver/t", partition_by=["day"])  # Spark marks k NOT NULL
    nulls = events(spark, 5).withColumn("k", F.lit(None).cast("bigint"))
    lake.write(nulls, "silver/t", partition_by=["day"])
    assert lake.read("silver/t").filter(F.col("k").isNull()).count() == 5


def test_append_with_other_schema_fails_and_commits_nothing(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 10), "silver/t", partition_by=["day"])
    files = table_files(lake.path("silver/t"))
    with pytest.raises(SchemaMismatchError, match=r"missing columns \['v'\].*unexpected columns \['w'\]"):
        lake.write(events(spark, 10).withColumnRenamed("v", "w"), "silver/t", partition_by=["day"])
    with pytest.raises(SchemaMismatchError, match="partitioned by"):
        lake.write(events(spark, 10), "silver/t", partition_by=[])
    assert lake.version("silver/t") == 0
    assert table_files(lake.path("silver/t")) == files


def test_failed_spark_job_leaves_table_untouched(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 50), "silver/t", partition_by=["day"])
    files = table_files(lake.path("silver/t"))
    exploding = events(spark, 50, offset=50).withColumn(
        "v", F.when(F.col("k") == 90, F.raise_error(F.lit("boom"))).otherwise(F.col("v"))
    )
    with pytest.raises(Exception, match="boom"):
        lake.write(exploding, "silver/t", partition_by=["day"])
    assert lake.version("silver/t") == 0
    assert lake.read("silver/t").count() == 50
    if lake.engine.name == "delta-rs":  # delta-spark writes into the table: vacuum removes the rest
        assert table_files(lake.path("silver/t")) == files
        assert not list(Path(lake.path("silver/t"), "_staging").glob("*"))


def test_idempotent_write_is_applied_once(spark, lake: Lakehouse) -> None:
    once = Idempotency("batch-7", 1)
    first = lake.write(events(spark, 10), "silver/t", idempotency=once)
    again = lake.write(events(spark, 10), "silver/t", idempotency=once)
    assert not first.skipped and again.skipped
    assert lake.read("silver/t").count() == 10
    assert lake.transaction_version("silver/t", "batch-7") == 1
    assert lake.transaction_version("silver/t", "other") is None
    lake.write(events(spark, 10), "silver/t", idempotency=Idempotency("batch-7", 2))
    assert lake.read("silver/t").count() == 20


def test_arrow_appends_are_idempotent_and_typed_like_the_table(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 10), "silver/t", partition_by=("day",))
    batch = events(spark, 5, offset=10).toArrow()
    first = lake.write(batch, "silver/t", partition_by=("day",), idempotency=Idempotency("s", 0))
    again = lake.write(batch, "silver/t", partition_by=("day",), idempotency=Idempotency("s", 0))
    assert first.rows_written == 5 and again.skipped
    # an empty batch still records its transaction, so its replay is skipped too
    empty = lake.write(batch.slice(0, 0), "silver/t", partition_by=("day",), idempotency=Idempotency("s", 1))
    assert empty.version == first.version + 1 and lake.transaction_version("silver/t", "s") == 1
    table = DeltaTable(lake.path("silver/t"))
    assert table.metadata().partition_columns == ["day"]
    assert sorted(table.to_pyarrow_table().column("k").to_pylist()) == list(range(15))
    with pytest.raises(SchemaMismatchError):
        lake.write(pa.table({"k": [1]}), "silver/t", partition_by=("day",))
    with pytest.raises(SchemaMismatchError):
        lake.write(batch, "silver/t")  # partitioning differs


def test_overwrite_selected_partitions_only(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 100), "silver/t", partition_by=["day"])
    days = sorted(r.day for r in lake.read("silver/t").select("day").distinct().collect())
    first_day = str(days[0])
    replacement = events(spark, 100).filter(F.col("day") == first_day).withColumn("v", F.lit(-1))
    lake.write(replacement, "silver/t", mode="overwrite", partition_by=["day"],
               partition_filters=[("day", "=", first_day)])
    after = lake.read("silver/t")
    assert after.count() == 100
    assert {r.v for r in after.filter(F.col("day") == first_day).collect()} == {-1}
    assert after.filter((F.col("day") != first_day) & (F.col("v") == -1)).count() == 0
    # Rows outside the replaced partitions are refused before anything is committed.
    version = lake.version("silver/t")
    with pytest.raises(ValueError, match="outside the partitions being replaced"):
        lake.write(events(spark, 100), "silver/t", mode="overwrite", partition_by=["day"],
                   partition_filters=[("day", "in", [first_day])])
    assert lake.version("silver/t") == version
    assert lake.read("silver/t").count() == 100


def test_full_overwrite_may_change_schema(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 10), "gold/t")
    lake.write(events(spark, 3).select("k"), "gold/t", mode="overwrite")
    assert lake.read("gold/t").columns == ["k"]
    assert lake.read("gold/t").count() == 3


def test_upsert_inserts_updates_and_respects_condition(spark, lake: Lakehouse) -> None:
    schema = "user long, score double, at long"
    lake.upsert(spark.createDataFrame([(1, 0.1, 10), (2, 0.2, 10)], schema), "serving/t", keys=["user"])
    result = lake.upsert(
        spark.createDataFrame([(2, 0.9, 20), (3, 0.3, 20), (1, 0.5, 5)], schema),
        "serving/t",
        keys=["user"],
        update_condition="s.at >= t.at",  # an older row never replaces a newer one
    )
    assert result.rows_written == 2
    rows = {r.user: (r.score, r.at) for r in lake.read("serving/t").collect()}
    assert rows == {1: (0.1, 10), 2: (0.9, 20), 3: (0.3, 20)}
    replay = lake.upsert(
        spark.createDataFrame([(4, 0.4, 30)], schema), "serving/t", keys=["user"],
        idempotency=Idempotency("stream", 5),
    )
    skipped = lake.upsert(
        spark.createDataFrame([(5, 0.5, 30)], schema), "serving/t", keys=["user"],
        idempotency=Idempotency("stream", 5),
    )
    assert not replay.skipped and skipped.skipped
    assert lake.read("serving/t").count() == 4
    # an empty upsert still records its transaction: its replay is recognised too
    lake.upsert(spark.createDataFrame([], schema), "serving/t", keys=["user"], idempotency=Idempotency("stream", 6))
    assert lake.transaction_version("serving/t", "stream") == 6
    assert lake.read("serving/t").count() == 4


def test_delete_history_and_time_travel(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 20), "silver/t")
    time.sleep(1.1)
    between = datetime.now(UTC)
    time.sleep(1.1)
    lake.write(events(spark, 20, offset=20), "silver/t")
    deleted = lake.delete("silver/t", "k < 5")
    assert deleted.rows_deleted == 5
    assert lake.read("silver/t").count() == 35
    assert lake.read("silver/t", version=0).count() == 20
    assert lake.read("silver/t", version=1).count() == 40
    assert lake.read("silver/t", timestamp=between).count() == 20
    with pytest.raises(TableNotFoundError, match="did not exist at"):
        lake.read("silver/t", timestamp=datetime(2000, 1, 1, tzinfo=UTC))
    operations = [c["operation"] for c in lake.history("silver/t")]
    # the first commit: "CREATE TABLE" to delta-rs, "WRITE" to delta-spark
    assert operations[:2] == ["DELETE", "WRITE"] and operations[-1] in ("CREATE TABLE", "WRITE")


def test_optimize_compacts_and_vacuum_removes_orphans(spark, lake: Lakehouse) -> None:
    for i in range(4):
        lake.write(events(spark, 10, offset=10 * i).coalesce(1), "silver/t")
    path = lake.path("silver/t")
    before = len(DeltaTable(path).file_uris())
    lake.optimize("silver/t")
    assert len(DeltaTable(path).file_uris()) < before
    assert lake.read("silver/t").count() == 40
    # What a crashed write leaves: a data file never committed, and a staging folder.
    orphan = Path(path) / "part-crashed.parquet"
    orphan.write_bytes(b"PAR1")
    stale = Path(path) / "_staging" / "dead"  # the delta-rs engine's staging
    stale.mkdir(parents=True)
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    os.utime(stale, (old, old))
    removed = lake.vacuum("silver/t", retention_hours=0)
    assert not orphan.exists()
    assert not stale.exists() or lake.engine.name == "delta-spark"
    assert any("part-crashed" in r for r in removed)
    assert lake.read("silver/t").count() == 40
    # versions before the compaction lost their files: a clear error, not a failed Spark job
    with pytest.raises(TableNotFoundError, match=r"v1 can no longer be read: .*vacuum"):
        lake.read("silver/t", version=1)


def test_missing_tables_and_bad_names(lake: Lakehouse) -> None:
    with pytest.raises(TableNotFoundError, match="silver/nothing"):
        lake.read("silver/nothing")
    with pytest.raises(ValueError, match="layer"):
        lake.path("platinum/t")
    with pytest.raises(ValueError):
        lake.path("silver/../etc")


def test_a_damaged_log_is_one_error_naming_the_table_and_the_others_still_list(spark, rs_lake: Lakehouse) -> None:
    rs_lake.write(events(spark, 10), "silver/a")
    rs_lake.write(events(spark, 10), "silver/a")
    rs_lake.write(events(spark, 5), "gold/b")
    newest = Path(rs_lake.path("silver/a")) / "_delta_log" / f"{1:020d}.json"
    newest.write_bytes(newest.read_bytes()[:40])  # truncated mid-record
    for attempt in (lambda: rs_lake.read("silver/a"), lambda: rs_lake.version("silver/a")):
        with pytest.raises(TableUnreadableError) as caught:
            attempt()
        message = str(caught.value)
        assert "silver/a" in message and "v1" in message and "damaged" in message
        assert "\n" not in message  # no traceback of delta-rs's threads
    listed = {t.name: t for t in rs_lake.tables()}
    assert listed["gold/b"].version == 0 and listed["gold/b"].error is None
    assert listed["silver/a"].version is None and "damaged" in (listed["silver/a"].error or "")


def test_vacuum_waits_for_writes_in_progress(spark, rs_lake: Lakehouse) -> None:
    """A write's files exist before its commit references them (delta-rs: a staging folder;
    delta-spark: the table folder): a short-retention vacuum meanwhile would delete them. The
    lock is the lakehouse's, whichever engine writes."""
    lake = rs_lake
    lake.write(events(spark, 10), "silver/t")
    vacuumed = threading.Event()

    def vacuum() -> None:
        lake.vacuum("silver/t", retention_hours=0)
        vacuumed.set()

    with lake._writing():  # a write on this root, between its files and its commit
        thread = threading.Thread(target=vacuum)
        thread.start()
        assert not vacuumed.wait(1.5)
    thread.join(120)
    assert vacuumed.is_set()
    assert lake.read("silver/t").count() == 10


def test_a_data_file_missing_from_the_newest_version_is_not_blamed_on_vacuum(spark, rs_lake: Lakehouse) -> None:
    rs_lake.write(events(spark, 50).repartition(2), "silver/t")
    victim = next(Path(rs_lake.path("silver/t")).glob("*.parquet"))
    victim.unlink()
    with pytest.raises(TableUnreadableError, match=r"v0 cannot be read: 1 of its 2 data files are gone, "
                                                    r"deleted outside Delta") as caught:
        rs_lake.read("silver/t")
    assert "removed by a vacuum" not in str(caught.value)


def test_read_table_reads_by_name_without_spark_and_exits_cleanly(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 300).repartition(6), "gold/t", partition_by=["day"])
    lake.write(events(spark, 10, offset=300), "gold/t", partition_by=["day"])
    script = (
        "import sys\n"
        "from recsys_spark.storage import read_table\n"
        "print(read_table(sys.argv[1], 'gold/t').num_rows, read_table(sys.argv[1], 'gold/t', version=0).num_rows)\n"
    )
    for _ in range(5):  # delta-rs's own file system aborted such scripts at exit in 3-4 runs of 20
        done = subprocess.run([sys.executable, "-c", script, lake.root], capture_output=True, text=True,
                              timeout=120)
        assert (done.returncode, done.stdout.split()) == (0, ["310", "300"]), done.stderr[-2000:]
    from recsys_spark.storage import read_table

    with pytest.raises(ValueError, match="layer"):
        read_table(lake.root, "platinum/t")
    with pytest.raises(TableNotFoundError):
        read_table(lake.root, "gold/nothing")


def test_tables_lists_every_table(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 5), "silver/a")
    lake.write(events(spark, 5), "gold/b")
    lake.write(events(spark, 5), "gold/b")
    assert [(t.name, t.version) for t in lake.tables()] == [("silver/a", 0), ("gold/b", 1)]


def test_lock_serialises_holders(rs_lake: Lakehouse) -> None:
    order: list[str] = []
    held = threading.Event()

    def first() -> None:
        with rs_lake.lock("ingest"):
            held.set()
            time.sleep(0.5)
            order.append("first-done")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with rs_lake.lock("ingest"):
        order.append("second")
    thread.join()
    assert order == ["first-done", "second"]


def test_engine_resolution_here(spark) -> None:
    assert resolve_engine(spark, "delta-rs").name == "delta-rs"
    if HAVE_DELTA_JARS:  # the shared session carries them
        assert delta_spark_loaded(spark)
        assert resolve_engine(spark, "auto").name == resolve_engine(spark, "delta-spark").name == "delta-spark"
    else:
        assert resolve_engine(spark, "auto").name == "delta-rs"
        with pytest.raises(EngineUnavailableError, match="jars are not on Spark's classpath"):
            resolve_engine(spark, "delta-spark")


@pytest.mark.delta_spark
@pytest.mark.skipif(not HAVE_DELTA_JARS, reason=NO_DELTA_JARS)
def test_each_engine_reads_the_others_tables_with_identical_rows(spark, tmp_path: Path) -> None:
    """Partition values with spaces, non-ASCII letters and nulls, and timestamps, written by each
    engine, read back identically by the other and by deltalake itself; so is the commit's
    metadata (a gold table written locally is trained on by a cluster on the other engine)."""
    rows = [(1, "a b", datetime(2024, 1, 1, 12, 30, 0, 123456, tzinfo=UTC)),
            (2, "Zürich", datetime(2024, 2, 29, 0, 0, tzinfo=UTC)),
            (3, None, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
            (4, "x=y/z", None)]
    df = spark.createDataFrame(rows, "k long, city string, ts timestamp")
    engines = {name: resolve_engine(spark, name) for name in ("delta-spark", "delta-rs")}
    for writer in engines:
        root = str(tmp_path / writer)
        recorded = {"feature_run_id": "features-1", "num_items": "3"}
        Lakehouse(root, engines[writer]).write(df, "silver/t", partition_by=["city"], commit_info=recorded)
        expected = sorted(rows, key=lambda r: r[0])
        for reader in engines.values():
            assert Lakehouse(root, reader).commit_metadata("silver/t", 0) == recorded, (writer, reader.name)
            back = Lakehouse(root, reader).read("silver/t").select("k", "city", "ts").collect()
            # Spark hands timestamps back as naive UTC wall times (the session zone is UTC)
            got = [(r.k, r.city, r.ts and r.ts.replace(tzinfo=UTC)) for r in back]
            assert sorted(got) == expected, (writer, reader.name)
        arrow = DeltaTable(f"{root}/silver/t").to_pyarrow_table().to_pylist()
        assert sorted((r["k"], r["city"], r["ts"]) for r in arrow) == expected, writer


def test_partition_values_with_special_characters_round_trip(spark, lake: Lakehouse) -> None:
    # Spark escapes such folder names (%20, %25, %3A); the Delta log must name them so that
    # both readers find the files, and the values must come back as written.
    values = ["home garden", "50%", "a:b", "x=y", "plain"]
    df = spark.createDataFrame([(i, v) for i, v in enumerate(values)], "k long, cat string")
    lake.write(df, "silver/t", partition_by=["cat"])
    assert sorted((r.k, r.cat) for r in lake.read("silver/t").collect()) == list(enumerate(values))
    arrow = DeltaTable(lake.path("silver/t")).to_pyarrow_table()
    pairs = zip(arrow.column("k").to_pylist(), arrow.column("cat").to_pylist(), strict=True)
    assert sorted(pairs) == list(enumerate(values))
    lake.write(df.filter("k = 0"), "silver/t", mode="overwrite", partition_by=["cat"],
               partition_filters=[("cat", "=", "home garden")])
    assert lake.read("silver/t").count() == len(values)


def test_deltalake_filtered_reads_use_sound_statistics(spark, rs_lake: Lakehouse) -> None:
    # delta-rs skips a file whose column has a null count but no min/max as if nothing matched:
    # every plain column needs sound bounds (long strings truncated, max rounded up).
    long = "z" * 40 + "tail"
    df = spark.createDataFrame(
        [(1, "pv", 1.5, Decimal("12.34"), True, long), (2, "buy", -2.5, Decimal("-5.00"), False, "a")],
        "k long, b string, score double, price decimal(10,2), flag boolean, text string",
    ).coalesce(1)
    rs_lake.write(df, "silver/t")
    table = DeltaTable(rs_lake.path("silver/t"))
    for column, value in [("b", "pv"), ("score", 1.5), ("price", Decimal("12.34")), ("flag", True),
                          ("text", long), ("k", 1)]:
        assert table.to_pyarrow_table(filters=[(column, "=", value)]).column("k").to_pylist() == [1], column


def test_a_column_without_footer_statistics_leaves_the_file_without_statistics(spark, rs_lake: Lakehouse) -> None:
    # Spark's Parquet writer drops a column's statistics (null count included) once its values
    # pass a few KB; the commit must neither crash nor record bounds it cannot vouch for.
    long = "9" * 5000
    df = spark.createDataFrame([(1, long), (2, "a"), (3, None)], "k long, text string").coalesce(1)
    rs_lake.write(df, "silver/t")
    rs_lake.write(df.filter("k = 2"), "silver/t")  # and a file with sound statistics beside it
    table = DeltaTable(rs_lake.path("silver/t"))
    stats = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    assert sorted(s["num_records"] for s in stats) == [1, 3]
    assert all(s.get("min.k") is None for s in stats if s["num_records"] == 3)
    for column, value, expected in [("text", long, [1]), ("text", "a", [2, 2]), ("k", 1, [1]), ("k", 2, [2, 2])]:
        rows = table.to_pyarrow_table(filters=[(column, "=", value)]).column("k").to_pylist()
        assert sorted(rows) == expected, (column, value)
    assert rs_lake.read("silver/t").filter(F.col("text").isNull()).count() == 1


def test_columns_without_sound_bounds_leave_the_file_without_statistics(spark, rs_lake: Lakehouse) -> None:
    # NaN has no place in min/max; a file with only a null count for the column would be
    # skipped by a filtered delta-rs read of that column.
    df = spark.createDataFrame([(1, float("nan")), (2, 3.0)], "k long, score double").coalesce(1)
    rs_lake.write(df, "silver/t")
    table = DeltaTable(rs_lake.path("silver/t"))
    assert table.to_pyarrow_table(filters=[("score", "=", 3.0)]).column("k").to_pylist() == [2]


def test_naive_timestamp_statistics_do_not_depend_on_the_local_zone(spark, rs_lake: Lakehouse, monkeypatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        df = spark.createDataFrame([(1, datetime(2024, 1, 1, 12))], "k long, t timestamp_ntz")
        rs_lake.write(df, "silver/t")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    deleted = rs_lake.delete("silver/t", "t = '2024-01-01T12:00:00'")
    assert deleted.rows_deleted == 1


def test_partition_overwrite_keeps_the_schema_of_other_partitions(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 100), "silver/t", partition_by=["day"])
    first_day = str(lake.read("silver/t").agg(F.min("day")).first()[0])
    slim = events(spark, 100).filter(F.col("day") == first_day).drop("v")
    with pytest.raises(SchemaMismatchError, match=r"missing columns \['v'\]"):
        lake.write(slim, "silver/t", mode="overwrite", partition_by=["day"],
                   partition_filters=[("day", "=", first_day)])
    assert lake.read("silver/t").columns == ["k", "v", "ts", "day"]


def test_partition_filters_take_equality_and_in_only(spark, lake: Lakehouse) -> None:
    df = spark.createDataFrame([(1, True), (2, False)], "k long, flag boolean")
    lake.write(df, "silver/t", partition_by=["flag"])
    lake.write(df.filter("flag").withColumn("k", F.lit(9).cast("long")), "silver/t", mode="overwrite",
               partition_by=["flag"], partition_filters=[("flag", "=", True)])
    assert sorted(r.k for r in lake.read("silver/t").collect()) == [2, 9]
    with pytest.raises(ValueError, match="'=' or 'in'"):
        lake.write(df.filter("not flag"), "silver/t", mode="overwrite", partition_by=["flag"],
                   partition_filters=[("flag", "!=", True)])
    assert sorted(r.k for r in lake.read("silver/t").collect()) == [2, 9]


def test_arrow_writes_refuse_unknown_columns(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 10), "silver/t")
    extra = events(spark, 2, offset=10).withColumn("reason", F.lit("x")).toArrow()
    with pytest.raises(SchemaMismatchError, match="reason"):
        lake.write(extra, "silver/t")
    with pytest.raises(SchemaMismatchError, match="reason"):
        lake.upsert(extra, "silver/t", keys=["k"])
    assert lake.read("silver/t").count() == 10


def test_reading_a_version_that_does_not_exist_names_the_latest(spark, lake: Lakehouse) -> None:
    lake.write(events(spark, 10), "silver/t")
    for version in (5, -1):
        with pytest.raises(TableNotFoundError, match=r"silver/t has no version .* \(latest 0\)"):
            lake.read("silver/t", version=version)


def test_column_names_with_dots_read_back(spark, lake: Lakehouse) -> None:
    lake.write(spark.createDataFrame([(1, 2.5)], "k long, `price.eur` double"), "gold/t")
    assert lake.read("gold/t").first()["price.eur"] == 2.5


def test_vacuum_rounds_the_retention_up(spark, rs_lake: Lakehouse) -> None:
    rs_lake.write(events(spark, 10), "silver/t")
    rs_lake.write(events(spark, 5), "silver/t", mode="overwrite")
    rs_lake.vacuum("silver/t", retention_hours=0.5)  # the replaced files are seconds old
    assert rs_lake.read("silver/t", version=0).count() == 10


def test_arrow_dataset_reads_what_deltalake_reads(spark, tmp_path: Path) -> None:
    # Local tables are read through Arrow's own file system (see arrow_dataset): the same rows,
    # partition values included, under a root with a space and a non-ASCII letter, and at an
    # older version.
    from recsys_spark.storage import open_lakehouse
    from recsys_spark.storage.delta_rs import arrow_dataset
    from tests.conftest import make_settings

    lake = open_lakehouse(spark, make_settings(tmp_path / "lake ü"))
    values = ["home garden", "50%", "a:b", "x=y", "ü"]
    df = spark.createDataFrame([(i, v) for i, v in enumerate(values)], "k long, cat string")
    lake.write(df, "serving/t", partition_by=["cat"])
    lake.write(df.filter("k < 2").withColumn("k", F.col("k") + 10), "serving/t", partition_by=["cat"])

    def rows(table: pa.Table) -> list[tuple]:
        return sorted(zip(table.column("k").to_pylist(), table.column("cat").to_pylist(), strict=True))

    for version in (0, 1):
        table = DeltaTable(lake.path("serving/t"), version=version)
        assert rows(arrow_dataset(table).to_table()) == rows(table.to_pyarrow_table())
    assert len(rows(arrow_dataset(DeltaTable(lake.path("serving/t"))).to_table())) == len(values) + 2


def test_partition_overwrite_and_merges_into_another_partition_both_commit(
    spark, lake: Lakehouse, tmp_path: Path
) -> None:
    # score-batch replaces source=batch of serving/recommendations while the nearline query
    # MERGEs into source=nearline every second: neither may fail on the other's commits.
    rows = [(u, s, 0) for u in range(50) for s in ("batch", "nearline")]
    lake.write(spark.createDataFrame(rows, "user_id long, source string, v long"), "serving/r",
               partition_by=["source"])
    merged: list[int] = []
    errors: list[BaseException] = []
    writing = threading.Event()
    overlapped = tmp_path / "two merges committed"

    def merge_nearline() -> None:
        writing.wait()
        try:
            for i in range(1, 1000):
                batch = pa.table({"user_id": pa.array([i % 50], pa.int64()), "source": ["nearline"],
                                  "v": pa.array([i], pa.int64())})
                lake.upsert(batch, "serving/r", keys=["user_id", "source"])
                merged.append(i)
                if i == 2:
                    overlapped.touch()
                if not writing.is_set():
                    return
        except BaseException as exc:
            errors.append(exc)

    flag = str(overlapped)

    @F.udf("long")
    def after_two_merges(value: int) -> int:
        # the write's job holds its snapshot until merges have committed after it (at most 3 min)
        deadline = time.monotonic() + 180
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        return value

    merger = threading.Thread(target=merge_nearline)
    merger.start()
    # one task: a delta-spark MERGE runs Spark jobs of its own on the other core
    slow = spark.range(0, 50, numPartitions=1).select(
        after_two_merges(F.col("id")).alias("user_id"), F.lit("batch").alias("source"),
        F.lit(1).cast("bigint").alias("v"))
    writing.set()
    try:
        lake.write(slow, "serving/r", mode="overwrite", partition_by=["source"],
                   partition_filters=[("source", "=", "batch")])
    finally:
        writing.clear()
        merger.join()
    assert not errors, errors
    history = lake.history("serving/r")
    replaced = max(c["version"] for c in history if c["operation"] == "WRITE")
    merges = [c["version"] for c in history if c["operation"] == "MERGE"]
    assert len([v for v in merges if v < replaced]) >= 2, history  # committed while the write ran
    result = lake.read("serving/r").groupBy("source").agg(F.count("*").alias("n"), F.max("v").alias("v"))
    assert {r.source: (r.n, r.v) for r in result.collect()} == {"batch": (50, 1), "nearline": (50, max(merged))}


@pytest.mark.skipif(not HAVE_DELTA_JARS, reason=NO_DELTA_JARS)
def test_fetched_jars_add_nothing_that_pyspark_ships() -> None:
    """Two versions of one library on the classpath (Hadoop, Jackson, Parquet...) fail at random."""
    import re

    import pyspark

    from tests.conftest import JARS_DIR

    def artifacts(folder: Path) -> dict[str, str]:
        named = (re.match(r"(.+?)-(\d+\.[\w.\-]*)\.jar$", jar.name) for jar in folder.glob("*.jar"))
        return {m[1]: m[2] for m in named if m}

    ours, shipped = artifacts(JARS_DIR), artifacts(Path(pyspark.__file__).parent / "jars")
    assert "delta-spark_4.2_2.13" in ours and "spark-sql-kafka-0-10_2.13" in ours
    assert not {name: (version, shipped[name]) for name, version in ours.items() if name in shipped}
