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
import subprocess
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


# The pipeline's variants, each on the same input in the same run: local on the embedded engine
# (the default), local on Delta's Spark engine, and on a Spark standalone cluster of two 1-core
# workers (scripts/services.py, on bench ports) with the delta-spark engine.
VARIANTS = ("delta-rs", "delta-spark", "cluster")
CLUSTER_PORT = 17177
CLUSTER_UI_PORT = 17180


def _settings(root: Path, variant: str = "delta-rs"):
    from recsys_spark.config import load_settings

    if variant == "cluster":
        overrides = ["logging.level=WARNING", f"spark.master=spark://127.0.0.1:{CLUSTER_PORT}",
                     f"spark.jars_dir={REPO / '.jars' / 'spark'}", f"spark.conf.spark.pyspark.python={sys.executable}"]
        return load_settings(REPO / "conf" / "standalone.yaml", root=root, overrides=overrides, environ={})
    return load_settings(REPO / "conf" / "local.yaml", root=root, environ={},
                         overrides=["logging.level=WARNING", f"storage.engine={variant}",
                                    f"spark.jars_dir={REPO / '.jars' / 'spark'}"])


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


def worker_pipeline(csv: str, work: Path, variant: str = "delta-rs") -> dict:
    from recsys_spark.features import build_features
    from recsys_spark.ingest import run_ingest
    from recsys_spark.spark import get_spark
    from recsys_spark.storage import open_lakehouse

    settings = _settings(work / f"lakehouse-{variant}", variant)
    started = time.perf_counter()
    spark = get_spark(settings)
    lake = open_lakehouse(spark, settings)
    spark.range(1).count()
    startup = time.perf_counter() - started
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
        "startup_seconds": startup,
        "rows_clean": report.rows_clean,
        "gold_rows": features.rows,
        "stages": stages.seconds,
    }


WORKERS = {"floor": worker_floor, "minimum": worker_minimum, "pipeline": worker_pipeline}


def _services(*args: str) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "services.py"), "--state",
                    str(REPO / ".tmp" / "bench-cluster"), *args], check=True)


def _stage_list(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, default=REPO / ".tmp" / "bench-etl")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="pipeline variants to run beside the floor (delta-rs is the reference)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, default="delta-rs", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        extra = (args.variant,) if args.worker == "pipeline" else ()
        print(json.dumps(WORKERS[args.worker](args.input, args.work, *extra)))
        return
    if "delta-rs" not in args.variants:
        parser.error("--variants must include delta-rs, the reference")
    if "cluster" in args.variants:
        _services("cluster-up", "--port", str(CLUSTER_PORT), "--ui-port", str(CLUSTER_UI_PORT),
                  "--worker-ui-port", str(CLUSTER_UI_PORT + 1))
    try:
        _run(args)
    finally:
        if "cluster" in args.variants:
            _services("cluster-down")


def _run(args: argparse.Namespace) -> None:

    from recsys_spark.generate import GeneratorConfig, write_log

    rows = []
    engine_rows = []
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
        variants = {}
        for variant in args.variants:
            variants[variant] = run_worker([__file__, "--worker", "pipeline", "--variant", variant, "--input",
                                            str(csv), "--work", str(work)])
            print(f"[{size:,}] pipeline {variant:<11} {variants[variant].result['seconds']:.1f}s  startup "
                  f"{variants[variant].result['startup_seconds']:.1f}s  peak "
                  f"{gib(variants[variant].peak_total_bytes)}", flush=True)
        pipe = variants["delta-rs"]
        rows.append((report.events, floor, minimum, pipe))
        engine_rows.append((report.events, floor, variants))
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
    if len(args.variants) > 1:
        engines = _engine_table(engine_rows)
        print("\n" + engines)
        record("etl-engines", engines)


def _engine_table(engine_rows: list) -> str:
    lines = [
        "## ETL on each engine and on a standalone cluster",
        "",
        f"`python bench/etl.py` on {machine()}, in one run and on one generated input per size: the pipeline "
        "(ingest + features) in local mode on the embedded engine (delta-rs, the default) and on Delta's own "
        "Spark engine (delta-spark), and on a Spark standalone cluster of two workers of 1 core each on this "
        "machine (`scripts/services.py`, `conf/standalone.yaml`: delta-spark, 4 shuffle partitions, 1.5 GB "
        "executors; the driver in the benchmark's process). Floor = plain Spark reading the CSV and writing "
        "Parquet, in the same run. Startup = session start and a first job. "
        "Ratio = pipeline seconds / delta-rs pipeline seconds.",
        "",
        "| events | variant | startup s | ingest s | features s | pipeline s | ratio to delta-rs | floor s "
        "| ratio to floor | peak (JVM / Python) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for events, floor, variants in engine_rows:
        reference = variants["delta-rs"].result["seconds"]
        for variant, run in variants.items():
            r = run.result
            lines.append(
                f"| {events:,} | {variant} | {r['startup_seconds']:.1f} | {r['ingest_seconds']:.1f} "
                f"| {r['features_seconds']:.1f} | {r['seconds']:.1f} | **{r['seconds'] / reference:.2f}** "
                f"| {floor.result['seconds']:.1f} | {r['seconds'] / floor.result['seconds']:.2f} "
                f"| {gib(run.peak_jvm_bytes)} / {gib(run.peak_python_bytes)} |")
    lines += ["", "Peak memory is the benchmark process tree's (driver JVM and Python; on the cluster the "
              "executors run in the workers' JVMs, outside it)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
