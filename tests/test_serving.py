"""Serving: business rules, batch scoring, the nearline stream (exactly once across a real
kill -9), champion hot-reload, the lookup read path and the replay tool."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import DeltaTable, write_deltalake

from recsys_spark.config import ServingSettings
from recsys_spark.errors import InputDataError
from recsys_spark.serving.lookup import RecommendationLookup, popular_items
from recsys_spark.serving.replay import LandingFolder, replay
from recsys_spark.serving.rules import BusinessRules, Catalogue, apply_rules, intra_list_diversity
from recsys_spark.serving.schemas import USER_STATE_SCHEMA
from recsys_spark.serving.streaming import UserHistory, merge_history
from tests.conftest import QUIET, TINY, make_settings, run_cli
from tests.nearline import assert_lineage_consistent, kill_9_mid_run, land, snapshot, stream_process, table

STREAM = ["--set", "serving.stream.max_files_per_trigger=1", "--set", "serving.stream.trigger_seconds=0.5"]


# --- pure parts ------------------------------------------------------------------------------------



def rules(**serving: object) -> BusinessRules:
    """The rules of serving settings with ``serving`` changed (every other value the default)."""
    return BusinessRules.from_settings(ServingSettings.model_validate(serving))

def test_rules_exclude_bought_and_denied_categories() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    catalogue = Catalogue(np.array([1, 1, 2, 2, 3]))
    indices, values = apply_rules(scores, [np.array([0])], catalogue, rules(k=3, category_deny=(2,)))
    assert indices.tolist() == [[1, 4, -1]]  # 0 bought, 2 and 3 denied; only two items left
    assert np.isnan(values[0, 2])
    indices, _ = apply_rules(scores, [np.array([], dtype=np.int64)], catalogue,
                             rules(k=2, category_allow=(2,)))
    assert indices.tolist() == [[2, 3]]


def test_mmr_lambda_zero_is_relevance_and_positive_lambda_diversifies() -> None:
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0]])
    catalogue = Catalogue(np.array([1, 1, 1, 2, 2, 3]))
    plain, _ = apply_rules(scores, [np.array([], dtype=np.int64)], catalogue, rules(k=3))
    assert plain.tolist() == [[0, 1, 2]]
    diverse, _ = apply_rules(scores, [np.array([], dtype=np.int64)], catalogue,
                             rules(k=3, diversity_lambda=0.5, candidates=6))
    assert diverse.tolist() == [[0, 3, 5]]  # best item, then the best of each new category
    assert intra_list_diversity(diverse, catalogue.categories)[0] == 1.0
    assert intra_list_diversity(plain, catalogue.categories)[0] == 0.0
    assert intra_list_diversity(np.array([[0, 1, 3]]), catalogue.categories)[0] == pytest.approx(2 / 3)


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_mmr_with_fewer_eligible_items_than_k_repeats_nothing(lam: float) -> None:
    # six of eight items bought: two left, whatever k and lambda (at 1.0, 0 * -inf is NaN)
    scores = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])
    catalogue = Catalogue(np.array([0, 0, 1, 1, 2, 2, 3, 3]))
    ruled = rules(k=5, diversity_lambda=lam, candidates=8)
    indices, values = apply_rules(scores, [np.array([0, 1, 2, 3, 4, 5])], catalogue, ruled)
    assert indices.tolist() == [[6, 7, -1, -1, -1]] and np.isnan(values[0, 2:]).all()
    indices, _ = apply_rules(scores, [np.array([0, 2])], catalogue, ruled)
    assert len(set(indices[0].tolist())) == 5 and not {0, 2} & set(indices[0].tolist())


def test_merge_history_is_idempotent_ordered_and_bounded() -> None:
    t = datetime(2024, 1, 1, tzinfo=UTC)
    start = UserHistory([1, 2], ["pv", "pv"], [t, t + timedelta(seconds=1)], set())
    events = [(3, "buy", t + timedelta(seconds=5)), (4, "pv", t + timedelta(seconds=3))]
    once = merge_history(start, events, max_length=3)
    assert once.item_ids == [2, 4, 3] and once.bought == {3}
    assert merge_history(once, events, max_length=3) == once


def test_replay_orders_by_event_time_and_retimes(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("1,10,5,pv,1511539500\n2,11,5,buy,1511539300\nnot,a,row\n3,12,6,pv,1511539400\n")
    clock = iter(np.arange(1000.0, 2000.0, 0.25))
    report = replay(log, "taobao", LandingFolder(tmp_path / "landing", "taobao"), rate=2,
                    clock=lambda: float(next(clock)), sleep=lambda s: None)
    files = sorted((tmp_path / "landing").glob("events-*.csv"))
    assert report.events == 4 and len(files) == report.sink["files"] == 4
    lines = [f.read_text().strip() for f in files]
    assert [line.split(",")[0] for line in lines] == ["2", "not", "3", "1"]  # time order; bad line kept
    assert all(int(line.split(",")[4]) >= 1000 for line in lines if line[0].isdigit())
    assert not list((tmp_path / "landing").glob(".*"))  # nothing half-written left behind
    # a second replay started in the same second (same clock) must not overwrite the first's files
    clock = iter(np.arange(1000.0, 2000.0, 0.25))
    replay(log, "taobao", LandingFolder(tmp_path / "landing", "taobao"), rate=2, clock=lambda: float(next(clock)),
           sleep=lambda s: None)
    assert len(list((tmp_path / "landing").glob("events-*.csv"))) == 8


@pytest.mark.parametrize("pace", [{"rate": 1e-300}, {"speedup": 1e-9}])
def test_replay_refuses_a_pace_that_would_take_years(tmp_path: Path, pace: dict) -> None:
    log = tmp_path / "log.csv"
    log.write_text("1,10,5,pv,1511539500\n2,11,5,buy,1511539300\n")
    with pytest.raises(InputDataError, match="raise --rate or --speedup"):
        replay(log, "taobao", LandingFolder(tmp_path / "landing", "taobao"), **pace,
               sleep=lambda s: pytest.fail("slept"))
    assert not (tmp_path / "landing").exists()


def test_replay_paces_by_plausible_times_and_leaves_rejectable_lines_alone(tmp_path: Path) -> None:
    # A malformed first line, a far-future time and a repeated key must neither stall the pace
    # (days of waiting) nor be retimed into valid events: the stream is to quarantine them.
    t0 = 1511539200
    good = [json.dumps({"user_id": 1, "item_id": i, "behavior_type": "pv", "ts": t0 + 10 * i}) for i in range(3)]
    odd = ["{broken", json.dumps({"user_id": 2, "item_id": 9, "behavior_type": "pv", "ts": 4102444800}),
           '{"user_id":3,"item_id":9,"behavior_type":"pv","ts":1511539205,"user_id":4}']
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join([odd[0], good[0], odd[1], good[1], odd[2], good[2]]) + "\n")
    waited: list[float] = []
    clock = iter(np.arange(1000.0, 9000.0, 0.25))
    report = replay(log, "jsonl", LandingFolder(tmp_path / "landing", "jsonl"), speedup=10,
                    clock=lambda: float(next(clock)), sleep=waited.append)
    assert report.events == 6 and sum(waited) < 10  # 20 s of log at 10x
    published = [line for f in (tmp_path / "landing").glob("events-*.jsonl") for line in f.read_text().splitlines()]
    assert set(odd) <= set(published)  # byte for byte


def test_lookup_prefers_newer_rows_and_falls_back_to_cold_start(tmp_path: Path) -> None:
    root = str(tmp_path)
    now = datetime.now(UTC)
    ts = pa.timestamp("us", tz="UTC")
    rows = pa.table({
        "user_id": pa.array([1, 1, 2, 3, 3, 4], pa.int64()),
        "item_ids": [[10, 11], [20, 21], [30], [40], [41], [50]],
        "scores": pa.array([[1.0, 0.5], [2.0, 1.5], [3.0], [1.0], [1.0], [9.0]], pa.list_(pa.float32())),
        "source": ["batch", "nearline", "batch", "nearline", "batch", "batch"],
        "model_name": ["sasrec"] * 5 + ["popularity"],
        "model_version": ["1"] * 6,
        "generated_at": pa.array([now - timedelta(minutes=5), now, now, now - timedelta(minutes=5), now, now], ts),
        # user 3: the stream saw a newer event than tonight's batch run over yesterday's gold
        "last_event_ts": pa.array([now - timedelta(hours=1)] * 3 + [now - timedelta(minutes=6),
                                                                   now - timedelta(hours=1), now], ts),
    })
    write_deltalake(f"{root}/serving/recommendations", rows)
    write_deltalake(f"{root}/gold/item_features", pa.table({
        "item_id": pa.array([7, 8, 9], pa.int64()), "pv_7d": [1, 30, 5], "buy_7d": [0, 0, 9]}))
    lookup = RecommendationLookup(root, refresh_seconds=0.0)
    assert lookup.get(1, k=1).item_ids == [20] and lookup.get(1).source == "nearline"
    assert lookup.get(2).item_ids == [30] and not lookup.get(2).cold_start
    assert lookup.get(3).item_ids == [40] and lookup.get(3).source == "nearline"
    assert lookup.get(4).cold_start and lookup.get(4).source == "batch"  # ranked by popularity
    cold = lookup.get(999, k=2)
    assert cold.cold_start and cold.source == "cold_start" and cold.item_ids == [8, 9]
    newer = rows.slice(2, 1)
    newer = newer.set_column(newer.schema.get_field_index("item_ids"), "item_ids", pa.array([[31, 32]]))
    newer = newer.set_column(newer.schema.get_field_index("generated_at"), "generated_at",
                             pa.array([now + timedelta(minutes=1)], ts))
    write_deltalake(f"{root}/serving/recommendations", newer, mode="append")
    assert lookup.get(2).item_ids == [31, 32]  # the cache follows the table's version
    # the cold-start list obeys the category rules too
    write_deltalake(f"{root}/gold/item_features", pa.table({
        "item_id": pa.array([7, 8, 9], pa.int64()), "category_id": pa.array([1, 2, 1], pa.int64()),
        "pv_7d": [1, 30, 5], "buy_7d": [0, 0, 9]}), mode="overwrite", schema_mode="overwrite")
    ruled = RecommendationLookup(root, rules=rules(k=2, category_deny=(2,)))
    assert ruled.get(999, k=2).item_ids == [9, 7]


def test_lookup_never_offers_what_gold_says_the_user_bought_since(tmp_path: Path) -> None:
    """A nearline list written before a batch ingest brought in a purchase must not offer that
    item until the user's next stream event re-scores them."""
    root = str(tmp_path)
    now = datetime.now(UTC)
    ts = pa.timestamp("us", tz="UTC")
    write_deltalake(f"{root}/serving/recommendations", pa.table({
        "user_id": pa.array([1, 2], pa.int64()), "item_ids": [[10, 11, 12], [10, 11]],
        "scores": pa.array([[3.0, 2.0, 1.0], [2.0, 1.0]], pa.list_(pa.float32())),
        "source": ["nearline", "batch"], "model_name": ["sasrec"] * 2, "model_version": ["1"] * 2,
        "generated_at": pa.array([now] * 2, ts), "last_event_ts": pa.array([now] * 2, ts)}))
    write_deltalake(f"{root}/silver/item_index", pa.table({
        "item_idx": pa.array([0, 1, 2], pa.int32()), "item_id": pa.array([10, 11, 12], pa.int64())}))

    def gold(bought: list[list[int]], mode: str = "error") -> None:
        write_deltalake(f"{root}/gold/user_sequences", pa.table({
            "user_id": pa.array([1, 2], pa.int64()), "bought_items": pa.array(bought, pa.list_(pa.int32()))}),
            mode=mode)

    gold([[], []])
    lookup = RecommendationLookup(root, refresh_seconds=0.0)
    assert lookup.get(1).item_ids == [10, 11, 12]
    gold([[1], [0, 1]], mode="overwrite")  # a batch ingest + features run: user 1 bought item 11
    first = lookup.get(1)
    assert first.item_ids == [10, 12] and first.scores == [3.0, 1.0]  # scores stay with their items
    assert lookup.get(2).item_ids == []
    unfiltered = RecommendationLookup(root, rules=rules(exclude_bought=False))
    assert unfiltered.get(1).item_ids == [10, 11, 12]


# --- against a trained champion ------------------------------------------------------------------


@pytest.fixture
def served_root(served, tmp_path) -> str:
    """A copy of the served lakehouse of this test's own: tests that write to it must not see
    each other's tables, whatever order they run in."""
    root = str(tmp_path / "served")
    shutil.copytree(served["pristine"], root)
    return root


def test_score_batch_writes_every_user_once_without_bought_items(served_root, capsys) -> None:
    root = served_root
    code, result, err = run_cli(capsys, "score-batch", "--root", root, "--json", *QUIET,
                                "--set", "serving.k=20", "--set", "serving.diversity_lambda=0.3")
    assert code == 0, err[-2000:]
    recs = table(root, "serving/recommendations").to_pylist()
    users = table(root, "gold/user_sequences").column("user_id").to_pylist()
    assert sorted(r["user_id"] for r in recs) == sorted(users)  # every user exactly once
    assert all(len(r["item_ids"]) == 20 and r["source"] == "batch" for r in recs)
    events = table(root, "silver/events").to_pylist()
    bought = {(e["user_id"], e["item_id"]) for e in events if e["behavior_type"] == "buy"}
    assert bought and not any((r["user_id"], i) in bought for r in recs for i in r["item_ids"])
    assert 0 < result["catalogue_coverage"] <= 1 and 0 <= result["intra_list_diversity"] <= 1
    assert table(root, "serving/item_embeddings").num_rows == 150 or result["item_embeddings_version"] >= 0


def test_score_batch_leaves_out_items_newer_than_the_champion(served, tmp_path, capsys) -> None:
    # New items ingested after training (a challenger that lost keeps the old champion).
    root = str(tmp_path / "lake")
    shutil.copytree(served["pristine"], root)
    users = table(root, "gold/user_sequences").column("user_id").to_pylist()[:5]
    times = [e.timestamp() for e in table(root, "silver/events").column("event_ts").to_pylist()]
    first, last = int(min(times)), int(max(times))
    newcomer = 800_000  # a new user who has seen only new items: nothing the champion knows
    new = tmp_path / "new.csv"
    everyone = table(root, "gold/user_sequences").column("user_id").to_pylist()
    # a new item early in everyone's history, so evaluation meets new items in its inputs too
    new.write_text("".join(f"{u},{900_000 + k},1,pv,{first + 60 * k}\n" for k, u in enumerate(users))
                   + "".join(f"{u},900100,1,pv,{first + 7}\n" for u in everyone)
                   + f"{newcomer},900001,1,pv,{last}\n{newcomer},900002,1,buy,{last + 1}\n")
    for argv in (("ingest", "--format", "taobao", "--input", str(new)), ("features",), ("score-batch",)):
        code, _, err = run_cli(capsys, *argv, "--root", root, *QUIET)
        assert code == 0, err[-2000:]
    # the champion is still evaluated on the grown catalogue (a gate depends on it)
    code, evaluated, err = run_cli(capsys, "evaluate", "--version", "1", "--root", root, "--json", *QUIET)
    assert code == 0, err[-2000:]
    assert evaluated["ndcg@10"] > 0
    recs = {r["user_id"]: r for r in table(root, "serving/recommendations").to_pylist()}
    assert set(users) <= set(recs) and recs[users[0]]["model_name"] == "sasrec"
    assert not any(i >= 900_000 for r in recs.values() for i in r["item_ids"])
    # ...and the newcomer gets the popular items (the cold-start list), not item index order
    fallback = recs[newcomer]
    known = [i for i in popular_items(root, 1000) if i < 900_000]  # the champion's catalogue
    assert fallback["model_name"] == "popularity" and len(fallback["item_ids"]) == 50  # serving.k
    assert fallback["item_ids"] == known[:50]
    assert fallback["scores"] == sorted(fallback["scores"], reverse=True) and fallback["scores"][0] > 0
    lookup = RecommendationLookup(root)
    assert lookup.get(newcomer).cold_start and lookup.get(newcomer).source == "batch"
    assert not lookup.get(users[0]).cold_start


def test_score_batch_never_offers_what_the_stream_saw_bought(served, tmp_path, capsys) -> None:
    # The stream is ahead of silver: a purchase it saw must not come back with the next batch run.
    root = str(tmp_path / "lake")
    shutil.copytree(served["pristine"], root)
    code, _, err = run_cli(capsys, "score-batch", "--root", root, *QUIET)
    assert code == 0, err[-2000:]
    first = table(root, "serving/recommendations").to_pylist()[0]
    user, top = first["user_id"], first["item_ids"][0]
    now = datetime.now(UTC)
    write_deltalake(f"{root}/serving/user_state", pa.Table.from_pylist([{
        "user_id": user, "item_ids": [top], "behaviors": ["buy"], "event_ts": [now], "bought": [top],
        "last_event_ts": now, "stream_batch_id": 0, "updated_at": now}], schema=USER_STATE_SCHEMA))
    # other rules in the same session: Python workers that keep the model must not keep the rules
    code, _, err = run_cli(capsys, "score-batch", "--root", root, "--set", "serving.k=7", *QUIET)
    assert code == 0, err[-2000:]
    again = {r["user_id"]: r for r in table(root, "serving/recommendations").to_pylist()}
    assert top not in again[user]["item_ids"] and len(again[user]["item_ids"]) == 7
    # rules that leave nothing: empty lists, and a warning saying why
    code, _, err = run_cli(capsys, "score-batch", "--root", root, "--set", "serving.category_allow=[123456789]",
                           *QUIET)
    assert code == 0 and "score_batch.empty_lists" in err
    assert not any(r["item_ids"] for r in table(root, "serving/recommendations").to_pylist() if r["source"] == "batch")


def test_nearline_rules_follow_rebuilt_item_features(spark, served, tmp_path) -> None:
    # A stream runs for days; the nightly features run must reach its rules without a restart.
    from pyspark.sql import functions as F

    from recsys_spark.serving.streaming import NearlineSink
    from recsys_spark.storage import open_lakehouse

    root = tmp_path / "lake"
    shutil.copytree(served["pristine"], root)
    settings = make_settings(root)
    lake = open_lakehouse(spark, settings)
    sink = NearlineSink(spark, lake, settings)
    first = sink._current_scorer()
    assert sink._current_scorer() is first  # nothing changed: nothing re-read
    features = lake.read("gold/item_features").withColumn("category_id", F.lit(999).cast("long"))
    lake.write(features.toArrow(), "gold/item_features", mode="overwrite")
    rebuilt = sink._current_scorer()
    assert rebuilt.champion is first.champion and set(rebuilt.catalogue.categories.tolist()) == {999}
    # A user whose stream state predates purchases that batch ingest brought to gold since:
    # those purchases count as bought too.
    buyer = next(r for r in table(str(root), "gold/user_sequences").to_pylist() if r["bought_items"])
    now = datetime.now(UTC)
    write_deltalake(f"{root}/serving/user_state", pa.Table.from_pylist([{
        "user_id": buyer["user_id"], "item_ids": [1], "behaviors": ["pv"], "event_ts": [now], "bought": [],
        "last_event_ts": now, "stream_batch_id": 0, "updated_at": now}], schema=USER_STATE_SCHEMA))
    raw = dict(zip(*table(str(root), "silver/item_index").select(["item_idx", "item_id"]).to_pydict().values(),
                   strict=True))
    history = sink._histories([buyer["user_id"]])[buyer["user_id"]]
    assert history.item_ids == [1] and {raw[i] for i in buyer["bought_items"]} <= history.bought


def test_nearline_reads_a_known_users_gold_once_per_gold_version(spark, served, tmp_path, monkeypatch) -> None:
    # The hot path: gold/user_sequences changes only when features run, so a user the stream
    # already knows is not looked up there again every micro-batch.
    from recsys_spark.serving import streaming
    from recsys_spark.storage import open_lakehouse

    root = tmp_path / "lake"
    shutil.copytree(served["pristine"], root)
    settings = make_settings(root)
    lake = open_lakehouse(spark, settings)
    sink = streaming.NearlineSink(spark, lake, settings)
    read_from_gold: list[list[int]] = []
    user_rows = streaming._user_rows

    def spy(root, table, version, users):
        if table == "gold/user_sequences":
            read_from_gold.append(list(users))
        return user_rows(root, table, version, users)

    monkeypatch.setattr(streaming, "_user_rows", spy)
    known, newcomer, stranger = sorted(table(str(root), "gold/user_sequences").column("user_id").to_pylist())[:3]
    now = datetime.now(UTC)
    write_deltalake(f"{root}/serving/user_state", pa.Table.from_pylist([{
        "user_id": known, "item_ids": [1], "behaviors": ["pv"], "event_ts": [now], "bought": [],
        "last_event_ts": now, "stream_batch_id": 0, "updated_at": now}], schema=USER_STATE_SCHEMA))
    sink._histories([known, newcomer])
    assert read_from_gold[-1] == [known, newcomer]
    # the next batch: the known user is not read again; a user without state always is
    histories = sink._histories([known, stranger])
    assert read_from_gold[-1] == [stranger] and histories[stranger].item_ids  # from gold
    sink._histories([known])
    assert read_from_gold[-1] == []
    # a features run (a new gold version): every user is read once more
    lake.write(lake.read("gold/user_sequences").toArrow(), "gold/user_sequences", mode="overwrite")
    sink._histories([known, stranger])
    assert read_from_gold[-1] == [known, stranger]


@pytest.mark.slow
def test_micro_batch_updates_touched_users_quarantines_and_hot_reloads(spark, served_root, tmp_path, capsys) -> None:
    from recsys_spark.serving.streaming import start_stream
    from recsys_spark.storage import open_lakehouse

    root = served_root
    landing = tmp_path / "landing[1]"  # glob characters in the folder are taken literally
    landing.mkdir()
    settings = make_settings(Path(root), f"serving.stream.landing={landing}", "serving.stream.trigger_seconds=0.5")
    lake = open_lakehouse(spark, settings)
    assert run_cli(capsys, "score-batch", "--root", root, *QUIET)[0] == 0
    before = {r["user_id"]: r for r in table(root, "serving/recommendations").to_pylist()}
    # two users with history and batch rows
    u1, u2 = sorted(table(root, "gold/user_sequences").column("user_id").to_pylist())[:2]
    now = int(time.time() * 1000)
    good = [json.dumps({"user_id": u, "item_id": i, "behavior_type": "pv", "ts": now})
            for u, i in ((u1, 5), (u2, 6), (u1, 7))]
    latin1 = b'{"user_id": 4, "item_id": 5, "behavior_type": "pv", "ts": 1, "city": "Z\xfcrich"}'
    land(landing, [*good, '{"user_id": 3, "item_id": "x", "behavior_type": "pv", "ts": 1}', "{broken", latin1],
          "a-10:00.jsonl")  # a ':' in the name must not stop the query
    query = start_stream(spark, lake, settings)
    try:
        query.processAllAvailable()
        nearline = [r for r in table(root, "serving/recommendations").to_pylist() if r["source"] == "nearline"]
        assert sorted(r["user_id"] for r in nearline) == [u1, u2]  # exactly the touched users
        assert {r["model_version"] for r in nearline} == {"1"}
        state = {r["user_id"]: r for r in table(root, "serving/user_state").to_pylist()}
        assert set(state) == {u1, u2} and state[u1]["item_ids"][-2:] == [5, 7]
        # every earlier purchase counts as bought, not only those inside the gold sequence window
        silver = table(root, "silver/events").to_pylist()
        for user in (u1, u2):
            buys = {e["item_id"] for e in silver if e["user_id"] == user and e["behavior_type"] == "buy"}
            assert buys <= set(state[user]["bought"])
        reasons = sorted(r["reason"] for r in table(root, "quarantine/events").to_pylist()
                         if r["ingest_run_id"].startswith("recsys-nearline-"))
        assert reasons == ["invalid_encoding", "invalid_id", "malformed_json"]
        metrics = table(root, "ops/stream_metrics").to_pylist()
        assert metrics[-1]["rows_in"] == 6 and metrics[-1]["rows_quarantined"] == 3
        assert metrics[-1]["latency_p95_s"] is not None

        # a new champion is picked up by the running query
        code, _, err = run_cli(capsys, "train", "--model", "mf", "--root", root, *TINY,
                               "--set", "training.learning_rate=1e-7")
        assert code == 0, err[-2000:]
        code, _, err = run_cli(capsys, "promote", "--version", "2", "--root", root, *QUIET)
        assert code == 0, err
        newcomer = 10**9 + 1  # unknown to the MF champion: popular items, not its item biases
        land(landing, [json.dumps({"user_id": u2, "item_id": 9, "behavior_type": "cart", "ts": now + 1000}),
                        json.dumps({"user_id": newcomer, "item_id": 9, "behavior_type": "pv", "ts": now + 1000})],
              "b.jsonl")
        query.processAllAvailable()
        assert query.isActive  # malformed input never stopped it
    finally:
        query.stop()
    rows = {(r["user_id"], r["source"]): r for r in table(root, "serving/recommendations").to_pylist()}
    assert rows[(u2, "nearline")]["model_version"] == "2" and rows[(u1, "nearline")]["model_version"] == "1"
    assert rows[(u2, "nearline")]["model_name"] == "mf" and rows[(newcomer, "nearline")]["model_name"] == "popularity"
    assert rows[(newcomer, "nearline")]["item_ids"][:10] == popular_items(root, 10)
    assert rows[(u1, "batch")]["item_ids"] == before[u1]["item_ids"]  # untouched by nearline upserts
    lookup = RecommendationLookup(root)
    assert lookup.get(u2).source == "nearline"
    # A query on a fresh checkpoint counts micro-batches from 0 again; its lists still replace
    # the older ones (u2's row came from batch 1 of the query above).
    fresh = make_settings(Path(root), f"serving.stream.landing={tmp_path / 'landing2'}",
                          f"serving.stream.checkpoint={tmp_path / 'checkpoint2'}")
    (tmp_path / "landing2").mkdir()
    land(tmp_path / "landing2", [json.dumps({"user_id": u2, "item_id": 11, "behavior_type": "pv",
                                              "ts": now + 2000})], "c.jsonl")
    query = start_stream(spark, open_lakehouse(spark, fresh), fresh)
    try:
        query.processAllAvailable()
    finally:
        query.stop()
    after = {(r["user_id"], r["source"]): r for r in table(root, "serving/recommendations").to_pylist()}
    assert after[(u2, "nearline")]["stream_batch_id"] == 0
    assert after[(u2, "nearline")]["generated_at"] > rows[(u2, "nearline")]["generated_at"]
    unknown = lookup.get(10**9)
    assert unknown.cold_start and unknown.source == "cold_start" and unknown.item_ids


def test_the_stream_quarantines_long_and_hostile_lines_and_keeps_running(spark, served, tmp_path) -> None:
    from recsys_spark.serving.streaming import start_stream
    from recsys_spark.storage import open_lakehouse

    root = tmp_path / "lake"
    shutil.copytree(served["pristine"], root)
    landing = tmp_path / "landing"
    landing.mkdir()
    settings = make_settings(root, f"serving.stream.landing={landing}", "serving.stream.trigger_seconds=0.5",
                             "ingest.max_line_bytes=65536")
    user = sorted(table(str(root), "gold/user_sequences").column("user_id").to_pylist())[0]
    good = json.dumps({"user_id": user, "item_id": 5, "behavior_type": "pv", "ts": int(time.time() * 1000)})
    wide = json.dumps({"user_id": user, "item_id": 6, "behavior_type": "pv", "ts": int(time.time() * 1000),
                       "note": "x" * 5000})  # a value whose Parquet statistics Spark drops
    land(landing, [good, wide, "9" * 200_000, "{" * 10_000, b"a\x00b"], "hostile.jsonl")
    query = start_stream(spark, open_lakehouse(spark, settings), settings)
    try:
        query.processAllAvailable()
        assert query.isActive
    finally:
        query.stop()
    ours = [r for r in table(str(root), "quarantine/events").to_pylist()
            if r["ingest_run_id"].startswith("recsys-nearline-")]
    assert sorted(r["reason"] for r in ours) == ["line_too_long", "malformed_json", "malformed_json"]
    (too_long,) = [r for r in ours if r["reason"] == "line_too_long"]
    assert too_long["detail"].startswith("line of 200000 bytes") and len(too_long["raw"]) == 256
    metrics = table(str(root), "ops/stream_metrics").to_pylist()[-1]
    assert (metrics["rows_in"], metrics["rows_clean"], metrics["rows_quarantined"]) == (5, 2, 3)
    bronze = DeltaTable(str(root / "bronze" / "events_raw"))
    assert bronze.to_pyarrow_table(filters=[("raw", "=", wide)]).num_rows == 1


@pytest.mark.slow
def test_kill_9_and_restart_equals_an_uninterrupted_run(served, tmp_path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    lines = served["stream_log"].read_text().splitlines()[:600]
    for i in range(6):  # six files -> six micro-batches (one file per trigger)
        land(landing, lines[i * 100:(i + 1) * 100], f"part-{i}.jsonl")
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    shutil.copytree(served["pristine"], reference)
    shutil.copytree(served["pristine"], interrupted)

    process = stream_process(reference, "--landing", str(landing), *STREAM)
    stderr = process.communicate(timeout=300)[1].decode()
    assert process.returncode == 0, stderr[-3000:]
    # A clean stop of an idle query is not worth a warning (Spark 4 logs one per stop).
    assert "Failed to cancel job group" not in stderr

    process = stream_process(interrupted, "--landing", str(landing), *STREAM)
    seed, committed = kill_9_mid_run(process, interrupted)  # somewhere inside a later micro-batch
    assert 1 <= committed < 6, f"kill landed after {committed} batches (RECSYS_TEST_KILL_SEED={seed})"
    process = stream_process(interrupted, "--landing", str(landing), *STREAM)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]

    expected, actual = snapshot(reference), snapshot(interrupted)
    for name in expected:
        assert actual[name] == expected[name], name
    landed = [r for r in map(json.loads, actual["bronze"]) if "/landing/" in r["source_file"]]
    assert len(landed) == 600  # every landed line in bronze exactly once
    assert len(table(reference, "ops/stream_metrics")) == 6  # one file per micro-batch
    assert_lineage_consistent(reference, landed=600)
    assert_lineage_consistent(interrupted, landed=600)
