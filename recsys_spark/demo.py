"""``recsys demo`` / ``make demo``: the whole pipeline on a synthetic log, end to end, locally.

Idempotent: the log is deterministic, so a second run finds it already ingested and rebuilds
the downstream tables.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys_spark.baselines import run_baselines
from recsys_spark.config import Settings
from recsys_spark.features import build_features
from recsys_spark.generate import GeneratorConfig, write_log
from recsys_spark.ingest import run_ingest
from recsys_spark.serving.lookup import RecommendationLookup
from recsys_spark.serving.replay import LandingFolder, replay
from recsys_spark.serving.scoring import score_all_users
from recsys_spark.serving.streaming import checkpoint_dir, landing_dir, run_stream
from recsys_spark.spark import get_spark, work_dir
from recsys_spark.storage import open_lakehouse
from recsys_spark.tracking import tracking_uri
from recsys_spark.training.runner import run_training

DEMO_MALFORMED_RATE = 0.01
DEMO_TRAINING_MINUTES = 3.0  # the demo shows the pipeline; `recsys train` alone trains to convergence
DEMO_BASELINES = ("popularity", "itemcf")
NEARLINE_EVENTS = 400


def run_demo(
    settings: Settings,
    *,
    users: int,
    items: int,
    days: int,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    started = time.perf_counter()
    log_path = Path(work_dir(settings)) / "demo" / "events.csv"
    say(f"1/7 generating a synthetic Taobao-style log: {users:,} users, {items:,} items, {days} days")
    generated = write_log(
        GeneratorConfig(users=users, items=items, days=days, seed=42),
        log_path,
        fmt="taobao",
        malformed_rate=DEMO_MALFORMED_RATE,
    )
    say(f"    {generated.lines:,} lines ({generated.malformed:,} deliberately malformed) -> {log_path}")

    spark = get_spark(settings)
    lake = open_lakehouse(spark, settings)
    say(f"2/7 ingesting into Delta tables under {settings.root} (engine: {lake.engine.name})")
    ingest = run_ingest(spark, lake, settings, input_path=str(log_path), fmt="taobao")
    say(
        f"    {ingest.status}: {ingest.rows_in:,} rows in = {ingest.rows_clean:,} clean + "
        f"{ingest.rows_quarantined:,} quarantined + {ingest.rows_duplicate:,} duplicate"
    )
    if ingest.quarantine_reasons:
        say(f"    quarantine reasons: {ingest.quarantine_reasons}")

    say("3/7 building gold features, sequences and training examples")
    features = build_features(spark, lake, settings)
    say(f"    as of {features.as_of:%Y-%m-%d %H:%M} UTC, split protocol {features.protocol}")

    processes = settings.training.num_processes
    say(f"4/7 training sasrec with TorchDistributor ({processes} process{'es' if processes > 1 else ''}, "
        f"at most {DEMO_TRAINING_MINUTES:g} minutes), logging to MLflow")
    settings.training.max_minutes = min(settings.training.max_minutes or DEMO_TRAINING_MINUTES, DEMO_TRAINING_MINUTES)
    trained = run_training(spark, lake, settings, model="sasrec")
    decision = "promoted to champion" if trained.promoted else f"champion stays v{trained.champion_version}"
    say(f"    registered {trained.registered_model} v{trained.model_version} ({decision}); test "
        f"ndcg@10={trained.test['ndcg@10']:.4f} hit@10={trained.test['hit@10']:.4f}")

    say(f"5/7 baselines on the same split: {', '.join(DEMO_BASELINES)}")
    baselines = run_baselines(lake, settings, DEMO_BASELINES)
    for b in baselines:
        say(f"    {b['baseline']:<12} ndcg@10={b['test']['ndcg@10']:.4f} hit@10={b['test']['hit@10']:.4f}")

    say("6/7 batch scoring every user into serving/recommendations")
    scored = score_all_users(spark, lake, settings)
    say(f"    {scored['users']:,} users, coverage {scored['catalogue_coverage']:.1%}, "
        f"intra-list diversity {scored['intra_list_diversity']:.3f}")

    say(f"7/7 nearline: replaying {NEARLINE_EVENTS} fresh events into the landing folder, streaming them")
    stream_log = Path(work_dir(settings)) / "demo" / "fresh.jsonl"
    write_log(GeneratorConfig(users=users, items=items, days=1, seed=43), stream_log, fmt="jsonl")
    landing = landing_dir(settings)
    for folder in (landing, checkpoint_dir(settings)):  # a rerun of the demo starts its stream afresh
        shutil.rmtree(folder, ignore_errors=True)
    replay(stream_log, "jsonl", LandingFolder(landing, "jsonl"), rate=NEARLINE_EVENTS, limit=NEARLINE_EVENTS)
    user = _first_known_user(stream_log, RecommendationLookup(settings.root))
    before = RecommendationLookup(settings.root).get(user, 5)
    streamed = run_stream(spark, lake, settings, until_idle=5)
    after = RecommendationLookup(settings.root).get(user, 5)
    say(f"    {streamed['batches']} micro-batches; user {user} before: {before.item_ids} ({before.source})")
    say(f"    {' ' * len(str(user))}      after:  {after.item_ids} ({after.source})")

    say("")
    say("Tables written:")
    for table in lake.tables():
        say(f"  {table.name:<26} v{table.version:<4} {table.path}")
    elapsed = round(time.perf_counter() - started, 1)
    uri = tracking_uri(settings)
    say(f"\nMLflow runs are stored in {uri}")
    say(f"Open the UI:  make mlflow-ui   (or: .venv/bin/recsys ui --root {settings.root}) -> http://127.0.0.1:5000")
    say(f"A user's list: .venv/bin/recsys recommend --root {settings.root} --user {user}")
    say(f"Done in {elapsed}s.")
    return {
        "generated": generated.lines,
        "ingest": ingest.as_dict(),
        "features": features.as_dict(),
        "training": trained.as_dict(),
        "baselines": baselines,
        "batch_scoring": scored,
        "nearline": {"user": user, "before": before.as_dict(), "after": after.as_dict(), **streamed},
        "tracking_uri": uri,
        "tables": [t.name for t in lake.tables()],
        "seconds": elapsed,
    }


def _first_known_user(log: Path, lookup: RecommendationLookup) -> int:
    """A user of the replayed slice who already has a batch list (so "before" is personal)."""
    users: list[int] = []
    with log.open() as handle:
        for _, line in zip(range(NEARLINE_EVENTS), handle, strict=False):
            users.append(int(json.loads(line)["user_id"]))
            if not lookup.get(users[-1]).cold_start:
                return users[-1]
    return users[0]
