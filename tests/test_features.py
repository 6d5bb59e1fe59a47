"""Feature transforms on hand-computed examples, and the gold build through the CLI."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from recsys_spark.constants import (
    GOLD_ITEM_FEATURES,
    GOLD_TRAINING_EXAMPLES,
    GOLD_USER_FEATURES,
    GOLD_USER_SEQUENCES,
    OPS_FEATURE_RUNS,
    SILVER_EVENTS,
)
from recsys_spark.features.aggregates import build_item_features
from recsys_spark.features.sequences import (
    UserTable,
    cluster_user_events,
    derive_user_tables,
    leave_one_out_table,
    temporal_table,
    user_features_table,
    user_sequences_table,
    user_table,
)
from recsys_spark.generate import GeneratorConfig, write_log
from recsys_spark.storage import Lakehouse
from tests.conftest import run_cli

pytestmark = pytest.mark.spark

T = datetime(2024, 1, 31, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SCHEMA = ("user_idx int, user_id long, item_idx int, item_id long, category_id long, behavior_type string, "
          "event_ts timestamp")


def frame(spark, rows: list[tuple]) -> object:
    """rows: (user, item, category, behavior, time); idx = id for readability."""
    return spark.createDataFrame(
        [(u, u, i, i, c, b, t) for u, i, c, b, t in rows], SCHEMA
    )


def derive(events, table: UserTable):
    return user_table(derive_user_tables(cluster_user_events(events), [table]), table)


@pytest.fixture(scope="module")
def toy(spark):
    return frame(
        spark,
        [
            (1, 10, 100, "pv", T - 40 * DAY),
            (1, 10, 100, "buy", T - 20 * DAY),
            (1, 11, 100, "pv", T - 3 * DAY),
            (1, 12, 200, "pv", T - 2 * DAY),
            (1, 12, 200, "cart", T - timedelta(hours=2)),
            (1, 13, 300, "pv", T),
            (2, 10, 100, "pv", T - 10 * DAY),
            (2, 10, 100, "pv", T - 9 * DAY),
        ],
    )


def test_user_features_by_hand(toy) -> None:
    features = derive(toy, user_features_table(as_of=T, windows_days=[1, 7, 30], top_categories=2))
    rows = {r.user_id: r for r in features.collect()}
    u1 = rows[1]
    assert (u1.pv_1d, u1.pv_7d, u1.pv_30d, u1.pv_total) == (1, 3, 3, 4)
    assert (u1.cart_1d, u1.buy_7d, u1.buy_30d, u1.buy_total) == (1, 0, 1, 1)
    assert u1.total_events == 6 and u1.distinct_categories == 3
    assert u1.recency_seconds == 0
    assert u1.view_to_buy_rate == pytest.approx(1 / 4)
    assert u1.top_categories == [100, 200]  # 3 events in 100, 2 in 200
    u2 = rows[2]
    assert u2.recency_seconds == 9 * 86_400 and u2.view_to_buy_rate == 0.0
    assert u2.top_categories == [100]


def test_item_features_by_hand(toy) -> None:
    rows = {r.item_id: r for r in build_item_features(toy, as_of=T, windows_days=[7, 30]).collect()}
    assert (rows[10].pv_total, rows[10].buy_30d, rows[10].pv_7d, rows[10].pv_30d) == (3, 1, 0, 2)
    assert rows[10].conversion_rate == pytest.approx(1 / 3)
    assert rows[12].conversion_rate == 0.0 and rows[12].cart_7d == 1
    assert rows[13].category_id == 300


def test_windows_count_sub_second_times_exactly(spark) -> None:
    # as_of has a fraction; an event 86,399.95 s old is inside the 1-day window, one exactly a
    # day old is not (whole seconds would put the first on the edge).
    as_of = T + timedelta(milliseconds=900)
    rows = [(1, 10, 1, "pv", as_of), (1, 11, 1, "pv", as_of - DAY + timedelta(milliseconds=50)),
            (1, 12, 1, "pv", as_of - DAY)]
    events = frame(spark, rows)
    (user,) = derive(events, user_features_table(as_of=as_of, windows_days=[1], top_categories=1)).collect()
    assert user.pv_1d == 2
    items = {r.item_id: r.pv_1d for r in build_item_features(events, as_of=as_of, windows_days=[1]).collect()}
    assert items == {10: 1, 11: 1, 12: 0}


def test_item_category_is_the_latest_known_one(spark) -> None:
    rows = [(1, 50, 7, "pv", T - DAY), (1, 50, None, "pv", T), (1, 51, None, "pv", T)]
    items = {r.item_id: r.category_id for r in build_item_features(frame(spark, rows), as_of=T,
                                                                     windows_days=[1]).collect()}
    assert items == {50: 7, 51: None}


def test_sequences_sorted_with_repeats_collapsed_or_kept(toy) -> None:
    def items(collapse: bool) -> dict[int, list[int]]:
        seqs = derive(toy, user_sequences_table(max_length=10, collapse_repeats=collapse))
        return {r.user_id: r.items for r in seqs.collect()}

    assert items(False)[1] == [10, 10, 11, 12, 12, 13]
    assert items(True) == {1: [10, 11, 12, 13], 2: [10]}


def test_user_sequences_keep_most_recent_with_gaps(toy) -> None:
    seqs = derive(toy, user_sequences_table(max_length=3, collapse_repeats=False))
    u1 = {r.user_id: r for r in seqs.collect()}[1]
    assert u1.items == [12, 12, 13] and u1.length == 3
    assert u1.behaviors == [1, 2, 1]  # pv, cart, pv
    assert u1.gaps == [0, 2 * 86_400 - 7_200, 7_200]


def test_one_pass_derives_each_table_as_it_would_alone(toy) -> None:
    tables = [
        user_features_table(as_of=T, windows_days=[1, 7], top_categories=2),
        user_sequences_table(max_length=10, collapse_repeats=True),  # collapsed beside uncollapsed
        leave_one_out_table(max_length=2, collapse_repeats=False),
    ]
    derived = derive_user_tables(cluster_user_events(toy), tables)
    for table in tables:
        together = sorted(map(str, user_table(derived, table).collect()))
        alone = sorted(map(str, derive(toy, table).collect()))
        assert together and together == alone, table.name


def test_leave_one_out_by_hand(spark) -> None:
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    events = frame(spark, [(1, i, None, "buy", t0 + i * timedelta(hours=1)) for i in (5, 6, 7, 8, 9)]
                   + [(2, 5, None, "buy", t0), (2, 6, None, "buy", t0 + DAY)])
    examples = derive(events, leave_one_out_table(max_length=2, collapse_repeats=True))
    got = {(r.user_id, r.split): (r.history_items, r.targets) for r in examples.collect()}
    assert got == {
        (1, "train"): ([5, 6, 7], []),  # max_length + 1 positions for next-item training
        (1, "validation"): ([6, 7], [8]),
        (1, "test"): ([7, 8], [9]),
        (2, "train"): ([5, 6], []),  # too short to evaluate
    }


def test_temporal_split_by_hand(spark) -> None:
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    rows = [(1, 1, None, "pv", t0), (1, 2, None, "pv", t0 + DAY), (1, 3, None, "pv", t0 + 5 * DAY),
            (1, 3, None, "buy", t0 + 5 * DAY + timedelta(minutes=1)), (1, 4, None, "pv", t0 + 8 * DAY),
            (2, 9, None, "pv", t0 + 6 * DAY)]
    examples = derive(frame(spark, rows), temporal_table(
        validation_start=t0 + 4 * DAY, test_start=t0 + 7 * DAY, max_length=10, collapse_repeats=False,
    ))
    got = {(r.user_id, r.split): (r.history_items, r.targets) for r in examples.collect()}
    assert got == {
        (1, "train"): ([1, 2], []),
        (1, "validation"): ([1, 2], [3]),  # distinct targets
        (1, "test"): ([1, 2, 3, 3], [4]),
        (2, "validation"): ([], [9]),  # a cold user is evaluated with an empty history
    }


def test_temporal_targets_survive_collapsing(spark) -> None:
    # The item the history ends with, bought in the test window, is still the test target.
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    rows = [(1, 1, None, "pv", t0), (1, 3, None, "pv", t0 + DAY), (1, 3, None, "cart", t0 + 2 * DAY),
            (1, 3, None, "buy", t0 + 8 * DAY)]
    examples = derive(frame(spark, rows), temporal_table(
        validation_start=t0 + 4 * DAY, test_start=t0 + 7 * DAY, max_length=10, collapse_repeats=True,
    ))
    got = {(r.user_id, r.split): (r.history_items, r.history_behaviors, r.targets) for r in examples.collect()}
    assert got == {(1, "train"): ([1, 3], [1, 2], []), (1, "test"): ([1, 3], [1, 2], [3])}


@pytest.fixture
def ingested(spark, lake: Lakehouse, settings, capsys, tmp_path) -> Path:
    log = tmp_path / "events.csv"
    write_log(GeneratorConfig(users=400, items=300, days=10, seed=5), log)
    code, _, err = run_cli(capsys, "ingest", "--format", "taobao", "--input", str(log),
                           "--root", settings.root, "--set", "logging.level=WARNING")
    assert code == 0, err
    return log


def build(capsys, settings, *extra: str) -> dict:
    code, result, err = run_cli(capsys, "features", "--root", settings.root, "--json",
                                "--set", "logging.level=WARNING", *extra)
    assert code == 0, err
    return result


@pytest.mark.integration
def test_examples_never_see_the_future(spark, lake: Lakehouse, settings, capsys, ingested) -> None:
    report = build(capsys, settings)
    assert report["protocol"] == "temporal"
    val_start = datetime.fromisoformat(report["validation_start"])
    test_start = datetime.fromisoformat(report["test_start"])
    examples = lake.read(GOLD_TRAINING_EXAMPLES)
    assert {r.split for r in examples.select("split").distinct().collect()} == {"train", "validation", "test"}
    assert examples.filter(F.col("history_end_ts") > F.col("target_start_ts")).count() == 0
    assert examples.filter((F.col("split") == "train") & (F.col("history_end_ts") >= F.lit(val_start))).count() == 0
    early = (F.col("split") == "validation") & (F.col("target_start_ts") < F.lit(val_start))
    assert examples.filter(early).count() == 0
    assert examples.filter((F.col("split") == "test") & (F.col("history_end_ts") >= F.lit(test_start))).count() == 0
    # Each test target is an item the user really touched inside the test window.
    silver = lake.read(SILVER_EVENTS).filter(F.col("event_ts") >= F.lit(test_start))
    truth = {(r.user_idx, r.item_idx) for r in silver.select("user_idx", "item_idx").collect()}
    targets = examples.filter("split = 'test'").select("user_idx", F.explode("targets").alias("item_idx"))
    assert {(r.user_idx, r.item_idx) for r in targets.collect()} <= truth


@pytest.mark.integration
def test_events_after_as_of_change_nothing(spark, lake: Lakehouse, settings, capsys, ingested, tmp_path) -> None:
    """The no-leakage property itself: gold tables as of T ignore everything after T."""
    as_of = "2017-12-02T12:00:00+00:00"
    build(capsys, settings, "--as-of", as_of)
    before = {t: sorted(map(str, lake.read(t).collect())) for t in
              (GOLD_USER_FEATURES, GOLD_ITEM_FEATURES, GOLD_USER_SEQUENCES, GOLD_TRAINING_EXAMPLES)}
    late = tmp_path / "late.csv"
    late.write_text("".join(f"{u},{i},1,buy,{1512300000 + u}\n" for u in range(1, 60) for i in (1, 2)))
    code, _, err = run_cli(capsys, "ingest", "--format", "taobao", "--input", str(late),
                           "--root", settings.root, "--set", "logging.level=WARNING")
    assert code == 0, err
    build(capsys, settings, "--as-of", as_of)
    after = {t: sorted(map(str, lake.read(t).collect())) for t in before}
    assert after == before


@pytest.mark.integration
def test_rebuild_from_recorded_versions_is_exact(spark, lake: Lakehouse, settings, capsys, ingested, tmp_path) -> None:
    first = build(capsys, settings)
    original = sorted(map(str, lake.read(GOLD_TRAINING_EXAMPLES).collect()))
    more = tmp_path / "more.csv"
    write_log(GeneratorConfig(users=50, items=300, days=1, seed=99), more)
    run_cli(capsys, "ingest", "--format", "taobao", "--input", str(more), "--root", settings.root,
            "--set", "logging.level=WARNING")
    build(capsys, settings)  # newer data, different tables
    assert sorted(map(str, lake.read(GOLD_TRAINING_EXAMPLES).collect())) != original
    rebuilt = build(capsys, settings, "--silver-version", str(first["source_versions"][SILVER_EVENTS]),
                    "--as-of", first["as_of"])
    assert sorted(map(str, lake.read(GOLD_TRAINING_EXAMPLES).collect())) == original
    assert rebuilt["num_items"] == first["num_items"]
    runs = lake.read(OPS_FEATURE_RUNS).orderBy("created_at").collect()
    assert runs[0].source_versions == {SILVER_EVENTS: first["source_versions"][SILVER_EVENTS]}
    history = lake.history(GOLD_TRAINING_EXAMPLES, 1)[0]
    assert str(first["source_versions"][SILVER_EVENTS]) in str(history)


def test_features_without_silver_fail_clearly(settings, capsys) -> None:
    (Path(settings.root) / "bronze").mkdir(parents=True)  # a lakehouse, but no silver in it
    code, _, err = run_cli(capsys, "features", "--root", settings.root, "--set", "logging.level=WARNING")
    assert code == 1
    assert "error: table silver/events does not exist" in err


@pytest.mark.integration
def test_rebuild_ignores_how_later_ingests_would_split(spark, lake: Lakehouse, settings, capsys, tmp_path) -> None:
    # Sequences alone are split leave-one-out; a later event log switches new builds to
    # temporal, but a rebuild of the old silver version must still be leave-one-out.
    seqs = tmp_path / "seq.txt"
    seqs.write_text("".join(f"{u} " + " ".join(str(u * 7 % 13 + k) for k in range(6)) + "\n" for u in range(1, 30)))
    for fmt, path in (("sequences", seqs),):
        code, _, err = run_cli(capsys, "ingest", "--format", fmt, "--input", str(path),
                               "--root", settings.root, "--set", "logging.level=WARNING")
        assert code == 0, err
    first = build(capsys, settings)
    original = sorted(map(str, lake.read(GOLD_TRAINING_EXAMPLES).collect()))
    later = tmp_path / "later.csv"
    later.write_text("".join(f"{u},{u + 100},1,buy,{1700000000 + u}\n" for u in range(1, 30)))
    code, _, err = run_cli(capsys, "ingest", "--format", "taobao", "--input", str(later),
                           "--root", settings.root, "--set", "logging.level=WARNING")
    assert code == 0, err
    rebuilt = build(capsys, settings, "--silver-version", str(first["source_versions"][SILVER_EVENTS]),
                    "--as-of", first["as_of"])
    assert (first["protocol"], rebuilt["protocol"]) == ("leave-one-out", "leave-one-out")
    assert sorted(map(str, lake.read(GOLD_TRAINING_EXAMPLES).collect())) == original


@pytest.mark.integration
def test_as_of_past_the_data_warns_of_empty_windows(spark, settings, capsys, tmp_path) -> None:
    log = tmp_path / "events.csv"
    log.write_text("".join(f"{u},{i},1,pv,{1511539200 + 3600 * (u + i)}\n" for u in range(1, 9) for i in range(1, 9)))
    code, _, err = run_cli(capsys, "ingest", "--format", "taobao", "--input", str(log),
                           "--root", settings.root, "--set", "logging.level=WARNING")
    assert code == 0, err
    code, _, err = run_cli(capsys, "features", "--root", settings.root, "--as-of", "2030-01-01T00:00:00",
                           "--set", "logging.level=WARNING")
    assert code == 0, err
    assert "features.empty_windows" in err
