"""ETL benchmark: ingest + features against the I/O floor, at 1M and 10M synthetic events.

    python bench/etl.py [--sizes 1000000 10000000]

For each size, in one run and on the same generated Taobao-style CSV:

* floor — plain Spark: read the CSV with a schema, write it as Parquet;
* minimum — the writes the ETL issue mandates of any implementation, as bare Spark: raw lines to
  Parquet (bronze), typed rows to date-partitioned Parquet (silver) and the shuffle + sort of
  every event by user that per-user sequences need (output discarded). No validation, dedup,
  dictionaries, features or Delta commits: a lower bound, not a design;
* pipeline — ``run_ingest`` (bronze, quarantine, silver, dictionaries) then ``build_features``
  (four gold tables), exactly what ``recsys ingest`` + ``recsys features`` run.

Each is a fresh process (fresh JVM); time is measured after the Spark session is up. Memory is the
peak resident size of the whole process tree (Python driver + JVM; in local mode the JVM holds
the executors too). Prints the table and writes it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, gib, machine, record, run_worker

from recsys_spark.logs import event_fields

TARGET_RATIO = 2.0
TARGET_PEAK_GIB = 4.0
DAYS = 7
EVENTS_PER_USER_DAY = 4.7  # what the generator produces on average
FLOOR_SCHEMA = "user_id long, item_id long, category_id long, behavior_type string, ts long"


def _settings(root: Path):
    from recsys_spark.config import load_settings

    return load_settings(REPO / "conf" / "local.yaml", root=root,
                         overrides=["logging.level=WARNING"], environ={})


def worker_floor(csv: str, work: Path) -> dict:
    from recsys_spark.spark import get_spark

    spark = get_spark(_settings(work / "floor-root"))
    spark.range(1).count()
    start = time.perf_counter()
    spark.read.csv(csv, schema=FLOOR_SCHEMA).write.mode("overwrite").parquet(str(work / "floor.parquet"))
    return {"seconds": time.perf_counter() - start}


def worker_minimum(csv: str, work: Path) -> dict:
    from pyspark.sql import functions as F

    from recsys_spark.spark import get_spark

    spark = get_spark(_settings(work / "minimum-root"))
    spark.range(1).count()
    seconds = {}
    start = time.perf_counter()
    (
        spark.read.text(csv)
        .select(F.col("value").alias("raw"), F.lit(csv).alias("source_file"),
                F.lit("run").alias("run_id"), F.current_date().alias("ingest_date"))
        .write.partitionBy("ingest_date").parquet(str(work / "minimum-bronze"))
    )
    seconds["bronze"] = time.perf_counter() - start
    (
        spark.read.csv(csv, schema=FLOOR_SCHEMA)
        .withColumn("event_ts", F.timestamp_seconds("ts"))
        .withColumn("event_date", F.to_date("event_ts"))
        .write.partitionBy("event_date").parquet(str(work / "minimum-silver"))
    )
    seconds["silver"] = time.perf_counter() - start - seconds["bronze"]
    (
        spark.read.parquet(str(work / "minimum-silver"))
        .select("user_id", "item_id", "behavior_type", "ts")
        .repartition(spark.sparkContext.defaultParallelism * 4, "user_id")
        .sortWithinPartitions("user_id", "ts")
        .write.format("noop").mode("overwrite").save()
    )
    total = time.perf_counter() - start
    seconds["user shuffle"] = total - seconds["bronze"] - seconds["silver"]
    return {"seconds": total, "stages": seconds}


class _StageSeconds(logging.Handler):
    """Collects the seconds of every stage the pipeline logs with ``timed`` (``<stage>.done``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        fields = event_fields(record)
        event = record.getMessage()
        # "ingest.done" is the whole run's total, not a stage
        if event.endswith(".done") and "seconds" in fields and event.count(".") > 1:
            stage = event.removesuffix(".done") + (f" {fields['table']}" if "table" in fields else "")
            self.seconds[stage] = self.seconds.get(stage, 0.0) + fields["seconds"]


def worker_pipeline(csv: str, work: Path) -> dict:
    from recsys_spark.features import build_features
    from recsys_spark.ingest import run_ingest
    from recsys_spark.spark import get_spark
    from recsys_spark.storage import open_lakehouse

    settings = _settings(work / "lakehouse")
    spark = get_spark(settings)
    lake = open_lakehouse(spark, settings)
    spark.range(1).count()
    stages = _StageSeconds()
    logger = logging.getLogger("recsys")
    for handler in logger.handlers:
        handler.setLevel(logging.WARNING)  # the console stays quiet; stages are counted below
    logger.addHandler(stages)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    report = run_ingest(spark, lake, settings, input_path=csv, fmt="taobao")
    middle = time.perf_counter()
    features = build_features(spark, lake, settings)
    end = time.perf_counter()
    return {
        "ingest_seconds": middle - start,
        "features_seconds": end - middle,
        "seconds": end - start,
        "rows_clean": report.rows_clean,
        "gold_rows": features.rows,
        "stages": stages.seconds,
    }


WORKERS = {"floor": worker_floor, "minimum": worker_minimum, "pipeline": worker_pipeline}


def _stage_list(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, default=REPO / ".tmp" / "bench-etl")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.input, args.work)))
        return

    from recsys_spark.generate import GeneratorConfig, write_log

    rows = []
    for size in args.sizes:
        work = args.work / str(size)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        users = max(100, round(size / (DAYS * EVENTS_PER_USER_DAY)))
        csv = work / "events.csv"
        report = write_log(GeneratorConfig(users=users, items=users // 2, days=DAYS, seed=7), csv)
        print(f"[{size:,}] generated {report.events:,} events ({users:,} users)", flush=True)
        floor = run_worker([__file__, "--worker", "floor", "--input", str(csv), "--work", str(work)])
        print(f"[{size:,}] floor    {floor.result['seconds']:.1f}s  peak {gib(floor.peak_total_bytes)}", flush=True)
        minimum = run_worker([__file__, "--worker", "minimum", "--input", str(csv), "--work", str(work)])
        print(f"[{size:,}] minimum  {minimum.result['seconds']:.1f}s", flush=True)
        pipe = run_worker([__file__, "--worker", "pipeline", "--input", str(csv), "--work", str(work)])
        print(f"[{size:,}] pipeline {pipe.result['seconds']:.1f}s  peak {gib(pipe.peak_total_bytes)}", flush=True)
        rows.append((report.events, floor, minimum, pipe))
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "## ETL: ingest + features vs the I/O floor",
        "",
        f"`python bench/etl.py` on {machine()}, Spark `local[*]`, delta-rs engine. Floor = plain "
        "Spark reading the same CSV with a schema and writing Parquet. Minimum = the writes the "
        "issue mandates of any implementation, as bare Spark and plain Parquet: raw lines "
        "(bronze), typed rows partitioned by date (silver), and the shuffle + sort of every "
        "event by user that sequences need (output discarded); no validation, dedup, "
        "dictionaries, features or Delta commits. Pipeline = `run_ingest` (parse, bronze, "
        "quarantine, dedup, dictionaries, silver) + `build_features` (item features, user "
        "features, sequences, training examples). Each runs in a fresh process. Peak = resident "
        "memory of the whole process tree (Python driver + JVM, which in local mode also runs "
        "the executors).",
        "",
        "| events | floor s | minimum s (ratio) | ingest s | features s | pipeline s | ratio "
        "| s per 1M events | peak floor | peak pipeline (JVM / Python) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for events, floor, minimum, pipe in rows:
        ratio = pipe.result["seconds"] / floor.result["seconds"]
        lines.append(
            f"| {events:,} | {floor.result['seconds']:.1f} "
            f"| {minimum.result['seconds']:.1f} ({minimum.result['seconds'] / floor.result['seconds']:.2f}) "
            f"| {pipe.result['ingest_seconds']:.1f} "
            f"| {pipe.result['features_seconds']:.1f} | {pipe.result['seconds']:.1f} "
            f"| **{ratio:.2f}** | {pipe.result['seconds'] / events * 1e6:.1f} "
            f"| {gib(floor.peak_total_bytes)} | {gib(pipe.peak_total_bytes)} "
            f"({gib(pipe.peak_jvm_bytes)} / {gib(pipe.peak_python_bytes)}) |"
        )
    events, floor, minimum, pipe = rows[-1]
    lines += ["", f"Stages at {events:,} events (seconds): {_stage_list(pipe.result['stages'])}; "
              f"minimum: {_stage_list(minimum.result['stages'])}."]
    last_ratio = pipe.result["seconds"] / floor.result["seconds"]
    minimum_ratio = minimum.result["seconds"] / floor.result["seconds"]
    peak = max(p.peak_total_bytes for *_, p in rows) / 2**30
    lines += [
        "",
        f"Targets: ratio <= {TARGET_RATIO} at the largest size — "
        f"{'met' if last_ratio <= TARGET_RATIO else f'**not met** ({last_ratio:.2f})'}"
        + (f"; the mandated writes alone measure {minimum_ratio:.2f}" if minimum_ratio > TARGET_RATIO else "")
        + f"; peak driver memory <= {TARGET_PEAK_GIB} GiB — "
        f"{'met' if peak <= TARGET_PEAK_GIB else f'**not met** ({peak:.2f} GiB)'}.",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    record("etl", table)


if __name__ == "__main__":
    main()
