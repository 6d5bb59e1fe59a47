"""``recsys demo`` / ``make demo``: the whole pipeline on a synthetic log, end to end, locally.

Idempotent: the log is deterministic, so a second run finds it already ingested and rebuilds
the downstream tables.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_spark.baselines import run_baselines
from recsys_spark.config import Settings
from recsys_spark.features import FeatureReport, build_features
from recsys_spark.generate import GeneratorConfig, write_log
from recsys_spark.ingest import IngestReport, run_ingest
from recsys_spark.serving.lookup import RecommendationLookup
from recsys_spark.serving.replay import LandingFolder, replay
from recsys_spark.serving.scoring import score_all_users
from recsys_spark.serving.streaming import checkpoint_dir, landing_dir, run_stream
from recsys_spark.spark import get_spark, work_dir
from recsys_spark.storage import Lakehouse, open_lakehouse
from recsys_spark.tracking import tracking_uri
from recsys_spark.training.runner import TrainingReport, run_training

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

DEMO_MALFORMED_RATE = 0.01
DEMO_TRAINING_MINUTES = 3.0  # the demo shows the pipeline; `recsys train` alone trains to convergence
DEMO_BASELINES = ("popularity", "itemcf")
NEARLINE_EVENTS = 400


@dataclass
class _Demo:
    """The demo's session, lakehouse and settings, and where its lines go."""

    spark: SparkSession
    lake: Lakehouse
    settings: Settings
    say: Callable[[str], None]

    @property
    def folder(self) -> Path:
        return Path(work_dir(self.settings)) / "demo"

    def ingest(self, log_path: Path) -> IngestReport:
        self.say(f"2/7 ingesting into Delta tables under {self.settings.root} (engine: {self.lake.engine.name})")
        report = run_ingest(self.spark, self.lake, self.settings, input_path=str(log_path), fmt="taobao")
        self.say(f"    {report.status}: {report.rows_in:,} rows in = {report.rows_clean:,} clean + "
                 f"{report.rows_quarantined:,} quarantined + {report.rows_duplicate:,} duplicate")
        if report.quarantine_reasons:
            self.say(f"    quarantine reasons: {report.quarantine_reasons}")
        return report

    def features(self) -> FeatureReport:
        self.say("3/7 building gold features, sequences and training examples")
        report = build_features(self.spark, self.lake, self.settings)
        self.say(f"    as of {report.as_of:%Y-%m-%d %H:%M} UTC, split protocol {report.protocol}")
        return report

    def train(self) -> TrainingReport:
        processes = self.settings.training.num_processes
        self.say(f"4/7 training sasrec with TorchDistributor ({processes} process{'es' if processes > 1 else ''}, "
                 f"at most {DEMO_TRAINING_MINUTES:g} minutes), logging to MLflow")
        budget = self.settings.training.max_minutes or DEMO_TRAINING_MINUTES
        self.settings.training.max_minutes = min(budget, DEMO_TRAINING_MINUTES)
        report = run_training(self.spark, self.lake, self.settings, model="sasrec")
        decision = "promoted to champion" if report.promoted else f"champion stays v{report.champion_version}"
        self.say(f"    registered {report.registered_model} v{report.model_version} ({decision}); test "
                 f"ndcg@10={report.test['ndcg@10']:.4f} hit@10={report.test['hit@10']:.4f}")
        return report

    def baselines(self) -> list[dict[str, Any]]:
        self.say(f"5/7 baselines on the same split: {', '.join(DEMO_BASELINES)}")
        results = run_baselines(self.lake, self.settings, DEMO_BASELINES)
        for b in results:
            self.say(f"    {b['baseline']:<12} ndcg@10={b['test']['ndcg@10']:.4f} hit@10={b['test']['hit@10']:.4f}")
        return results

    def score(self) -> dict[str, Any]:
        self.say("6/7 batch scoring every user into serving/recommendations")
        report = score_all_users(self.spark, self.lake, self.settings)
        self.say(f"    {report['users']:,} users, coverage {report['catalogue_coverage']:.1%}, "
                 f"intra-list diversity {report['intra_list_diversity']:.3f}")
        return report

    def nearline(self, cfg: GeneratorConfig) -> dict[str, Any]:
        """Replay fresh events into the landing folder, stream them, show one user's list
        before and after."""
        self.say(f"7/7 nearline: replaying {NEARLINE_EVENTS} fresh events into the landing folder, streaming them")
        stream_log = self.folder / "fresh.jsonl"
        write_log(replace(cfg, days=1, seed=cfg.seed + 1), stream_log, fmt="jsonl")
        landing = landing_dir(self.settings)
        for folder in (landing, checkpoint_dir(self.settings)):  # a rerun of the demo starts its stream afresh
            shutil.rmtree(folder, ignore_errors=True)
        replay(stream_log, "jsonl", LandingFolder(landing, "jsonl"), rate=NEARLINE_EVENTS, limit=NEARLINE_EVENTS)
        root = self.settings.root
        user = _first_known_user(stream_log, RecommendationLookup(root))
        before = RecommendationLookup(root).get(user, 5)
        streamed = run_stream(self.spark, self.lake, self.settings, until_idle=5)
        after = RecommendationLookup(root).get(user, 5)
        self.say(f"    {streamed['batches']} micro-batches; user {user} before: {before.item_ids} ({before.source})")
        self.say(f"    {' ' * len(str(user))}      after:  {after.item_ids} ({after.source})")
        return {"user": user, "before": before.as_dict(), "after": after.as_dict(), **streamed}

    def summary(self, user: int, elapsed: float) -> None:
        self.say("")
        self.say("Tables written:")
        for table in self.lake.tables():
            self.say(f"  {table.name:<26} v{table.version:<4} {table.path}")
        root = self.settings.root
        self.say(f"\nMLflow runs are stored in {tracking_uri(self.settings)}")
        self.say(f"Open the UI:  make mlflow-ui   (or: .venv/bin/recsys ui --root {root}) -> http://127.0.0.1:5000")
        self.say(f"A user's list: .venv/bin/recsys recommend --root {root} --user {user}")
        self.say(f"Done in {elapsed}s.")


def run_demo(
    settings: Settings,
    *,
    users: int,
    items: int,
    days: int,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = GeneratorConfig(users=users, items=items, days=days, seed=42)
    log_path = Path(work_dir(settings)) / "demo" / "events.csv"
    say(f"1/7 generating a synthetic Taobao-style log: {users:,} users, {items:,} items, {days} days")
    generated = write_log(cfg, log_path, fmt="taobao", malformed_rate=DEMO_MALFORMED_RATE)
    say(f"    {generated.lines:,} lines ({generated.malformed:,} deliberately malformed) -> {log_path}")
    spark = get_spark(settings)
    demo = _Demo(spark, open_lakehouse(spark, settings), settings, say)
    ingest, features, trained = demo.ingest(log_path), demo.features(), demo.train()
    baselines, scored, nearline = demo.baselines(), demo.score(), demo.nearline(cfg)
    elapsed = round(time.perf_counter() - started, 1)
    demo.summary(nearline["user"], elapsed)
    return {
        "generated": generated.lines,
        "ingest": ingest.as_dict(),
        "features": features.as_dict(),
        "training": trained.as_dict(),
        "baselines": baselines,
        "batch_scoring": scored,
        "nearline": nearline,
        "tracking_uri": tracking_uri(settings),
        "tables": [t.name for t in demo.lake.tables()],
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
