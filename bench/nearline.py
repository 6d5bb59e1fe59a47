"""Nearline: sustained event rate through ``recsys stream``, from landed files and from a Kafka
topic, and single-user lookup latency.

    python bench/nearline.py [--source files,kafka] [--rate 200] [--minutes 5] [--ramp 400,800,1600]

1. builds a lakehouse with the product's commands (synthetic log -> ingest -> features ->
   ``recsys train`` with the default model, short time budget -> ``recsys score-batch``);
2. per source, runs ``recsys stream`` (``local[2]``) while ``recsys replay`` publishes events at
   ``--rate`` for ``--minutes`` (``--sink landing``: a file per half second; ``--sink kafka``: a
   message per event, keyed by user, into a new 3-partition topic of a local broker started by
   this benchmark); per event, latency = commit time of its micro-batch - its event time (replay
   stamps events when it publishes them); backlog = how long the stream needs after the last
   event is published, and whether latency grows from the first to the last third of the run;
3. repeats shorter runs at the ``--ramp`` rates to find the highest rate without backlog growth;
4. times ``RecommendationLookup.get`` on a 100k-user serving table after warm-up (p50/p99).

The machine's load (1-minute load average, sampled every 5 s) is recorded with each run: on a
shared host the numbers say as much about the neighbours as about the platform.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import REPO, machine, record
from deltalake import DeltaTable, write_deltalake

from recsys_spark.broker import LocalBroker, free_port
from recsys_spark.serving.lookup import RecommendationLookup
from recsys_spark.serving.replay import ensure_topic
from recsys_spark.serving.schemas import RECOMMENDATION_SCHEMA

QUIET = ["--set", "logging.level=WARNING"]


def recsys(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "recsys_spark.cli", *argv, "--json", *QUIET], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(root: Path) -> Path:
    log = root.parent / "nearline-base.csv"
    stream_log = root.parent / "nearline-stream.jsonl"
    if not (root / "serving" / "recommendations").exists():
        shutil.rmtree(root, ignore_errors=True)
        recsys("generate", "--users", "20000", "--items", "5000", "--days", "14", "--out", str(log))
        recsys("ingest", "--format", "taobao", "--input", str(log), "--root", str(root))
        recsys("features", "--root", str(root))
        recsys("train", "--model", "sasrec", "--root", str(root), "--set", "training.max_minutes=3")
        recsys("score-batch", "--root", str(root))
    if not stream_log.exists():
        recsys("generate", "--users", "20000", "--items", "5000", "--days", "3", "--seed", "7",
               "--format", "jsonl", "--out", str(stream_log))
    return stream_log


class LoadSampler:
    """The 1-minute load average, sampled every 5 s while a run lasts."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            with open("/proc/loadavg") as handle:
                self.samples.append(float(handle.read().split()[0]))
            self._done.wait(5)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def run_at(root: Path, stream_log: Path, rate: float, seconds: float, tag: str, source: str,
           broker: LocalBroker | None) -> dict:
    """One stream run from ``source`` at ``rate`` for ``seconds``; returns latency and backlog figures."""
    landing = root.parent / f"landing-{tag}"
    checkpoint = root.parent / f"checkpoint-{tag}"
    for folder in (landing, checkpoint):
        shutil.rmtree(folder, ignore_errors=True)
    if source == "kafka":
        assert broker is not None
        topic = f"bench-{tag}-{int(time.time())}"
        ensure_topic(broker.bootstrap_servers, topic, 3)
        where = ["--set", "serving.stream.source=kafka", "--set", f"serving.stream.kafka.topic={topic}",
                 "--set", f"serving.stream.kafka.bootstrap_servers={broker.bootstrap_servers}"]
        sink = ["--sink", "kafka", "--topic", topic, "--bootstrap-servers", broker.bootstrap_servers]
    else:
        landing.mkdir(parents=True)
        where = ["--landing", str(landing)]
        sink = ["--landing", str(landing)]
    started = time.time()  # metrics committed before this belong to earlier runs
    with LoadSampler() as load:
        stream = subprocess.Popen(
            [sys.executable, "-m", "recsys_spark.cli", "stream", "--root", str(root), *where,
             "--set", f"serving.stream.checkpoint={checkpoint}", "--set", "spark.master=local[2]",
             "--set", f"spark.jars_dir={REPO / '.jars' / 'spark'}",
             "--set", "serving.stream.trigger_seconds=1", *QUIET],
            stdout=subprocess.DEVNULL,
            stderr=open(root.parent / f"stream-{tag}.log", "w"),  # noqa: SIM115 - the child holds it
            start_new_session=True)
        time.sleep(45)  # session start and the first (empty) trigger
        events = int(rate * seconds)
        replay = recsys("replay", "--input", str(stream_log), "--format", "jsonl", *sink,
                        "--rate", str(rate), "--limit", str(events))
        replay_end = time.time()
        metrics_path = root / "ops" / "stream_metrics"
        deadline = time.time() + 300
        processed = 0
        while time.time() < deadline:
            if metrics_path.exists():
                rows = [r for r in DeltaTable(str(metrics_path)).to_pyarrow_table().to_pylist()
                        if r["committed_at"].timestamp() >= started]
                processed = sum(r["rows_in"] for r in rows)
                if processed >= events:
                    break
            time.sleep(1)
        stream.send_signal(signal.SIGTERM)  # the stream finishes what has arrived, then stops
        stream.wait(timeout=120)
    rows = sorted((r for r in DeltaTable(str(metrics_path)).to_pyarrow_table().to_pylist()
                   if r["committed_at"].timestamp() >= started), key=lambda r: r["batch_id"])
    done = max(r["committed_at"].timestamp() for r in rows)
    p95 = np.array([r["latency_p95_s"] for r in rows if r["latency_p95_s"] is not None])
    weights = np.array([r["rows_clean"] for r in rows if r["latency_p95_s"] is not None], dtype=float)
    third = max(1, len(p95) // 3)
    return {
        "source": source, "rate": rate, "seconds": seconds, "events": events, "processed": processed,
        "achieved_rate": round(replay["rate"], 1), "batches": len(rows),
        # p95 over events: the weighted 95th percentile of per-batch p95s (an upper-side estimate)
        "p95_latency_s": round(float(np.percentile(np.repeat(p95, weights.astype(int)), 95)), 2),
        "max_latency_s": round(max(r["latency_max_s"] or 0 for r in rows), 2),
        "p50_processing_s": round(float(np.median([r["processing_s"] for r in rows])), 2),
        "first_third_p95_s": round(float(np.mean(p95[:third])), 2),
        "last_third_p95_s": round(float(np.mean(p95[-third:])), 2),
        "drain_after_last_event_s": round(done - replay_end, 1),
        "load_avg": [round(min(load.samples), 1), round(float(np.mean(load.samples)), 1), round(max(load.samples), 1)],
    }


def backlog_grows(run: dict) -> bool:
    return (run["processed"] < run["events"] or run["drain_after_last_event_s"] > 10
            or run["last_third_p95_s"] > 2 * run["first_third_p95_s"] + 2)


def lookup_latency(folder: Path, users: int = 100_000, k: int = 50) -> dict:
    root = folder / "lookup"
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    items = rng.integers(0, 1_000_000, size=(users, k))
    now = datetime.now(UTC)
    table = pa.table({
        "user_id": pa.array(np.arange(users), pa.int64()),
        "user_idx": pa.array(np.arange(users), pa.int32()),
        "item_ids": pa.FixedSizeListArray.from_arrays(pa.array(items.reshape(-1)), k).cast(pa.list_(pa.int64())),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(users * k).astype(np.float32)), k)
        .cast(pa.list_(pa.float32())),
        "model_name": ["sasrec"] * users,
        "model_version": ["1"] * users,
        "generated_at": pa.array([now] * users, pa.timestamp("us", tz="UTC")),
        "last_event_ts": pa.array([now] * users, pa.timestamp("us", tz="UTC")),
        "stream_batch_id": pa.nulls(users, pa.int64()),
        "intra_list_diversity": rng.random(users),
        "source": ["batch"] * users,
    }, schema=RECOMMENDATION_SCHEMA)  # the serving table's own schema, as the stream writes it
    write_deltalake(str(root / "serving" / "recommendations"), table)
    started = time.perf_counter()
    lookup = RecommendationLookup(str(root), refresh_seconds=1.0)
    load = time.perf_counter() - started
    for user in rng.integers(0, users, 2000):  # warm-up
        lookup.get(int(user), 10)
    timings = []
    for user in rng.integers(0, int(users * 1.1), 20_000):  # ~9% unknown users (cold start)
        t = time.perf_counter_ns()
        lookup.get(int(user), 10)
        timings.append((time.perf_counter_ns() - t) / 1e6)
    return {"users": users, "snapshot_load_s": round(load, 2), "lookups": len(timings),
            "p50_ms": round(float(np.percentile(timings, 50)), 4),
            "p99_ms": round(float(np.percentile(timings, 99)), 4),
            "max_ms": round(float(np.max(timings)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="files,kafka", help="stream sources to measure, in this order")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--ramp", default="400,800,1600", help="rates tried for 60 s each")
    args = parser.parse_args()
    sources = [s for s in args.source.split(",") if s]
    if not set(sources) <= {"files", "kafka"}:
        parser.error("--source takes files and/or kafka")
    folder = REPO / ".tmp" / "bench-nearline"
    folder.mkdir(parents=True, exist_ok=True)
    root = folder / "lake"
    stream_log = build(root)
    lookup = lookup_latency(folder)
    print("lookup", lookup, flush=True)
    broker = None
    if "kafka" in sources:
        port = free_port(19092)
        broker = LocalBroker(folder / "kafka", port, free_port(port + 1), REPO / ".jars" / "kafka")
        broker.up(timeout=240, follow_parent=True)
    runs: dict[str, list[dict]] = {}
    try:
        for source in sources:
            sustained = run_at(root, stream_log, args.rate, args.minutes * 60, f"{source}-sustained", source, broker)
            print("sustained", sustained, flush=True)
            runs[source] = [sustained]
            for rate in [float(r) for r in args.ramp.split(",") if r]:
                run = run_at(root, stream_log, rate, 60, f"{source}-ramp-{int(rate)}", source, broker)
                print("ramp", run, flush=True)
                runs[source].append(run)
                if backlog_grows(run):
                    break
    finally:
        if broker is not None:
            broker.down()
    record("nearline", report(runs, args, lookup))
    print(report(runs, args, lookup))


def report(runs: dict[str, list[dict]], args: argparse.Namespace, lookup: dict) -> str:
    lines = [
        f"Machine: {machine()}; `recsys stream` on `local[2]`, 1 s trigger, default model (sasrec, "
        "3-minute training on a 20k-user synthetic log); events published by `recsys replay` into a landing "
        "folder (files) or a 3-partition topic of a local single-node Kafka broker (kafka). Measured "
        f"{datetime.now(UTC):%Y-%m-%d}; load = the host's 1-minute load average during the run (min/mean/max).",
        "",
        "| source | run | events/s (achieved) | events | micro-batches | p95 latency | max latency "
        "| median batch processing | p95 first → last third | drain after last event | backlog grows | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    highest: dict[str, float | None] = {}
    for source, measured in runs.items():
        for number, run in enumerate(measured):
            name = f"sustained {args.minutes:g} min" if number == 0 else "ramp 60 s"
            lines.append(
                f"| {source} | {name} | {run['rate']:.0f} ({run['achieved_rate']:.0f}) | {run['events']:,} | "
                f"{run['batches']} | {run['p95_latency_s']} s | {run['max_latency_s']} s | "
                f"{run['p50_processing_s']} s | "
                f"{run['first_third_p95_s']} → {run['last_third_p95_s']} s | {run['drain_after_last_event_s']} s | "
                f"{'yes' if backlog_grows(run) else 'no'} | {' / '.join(map(str, run['load_avg']))} |")
        highest[source] = max([r["rate"] for r in measured if not backlog_grows(r)], default=None)
    lines.append("")
    targets = {"files": 5.0, "kafka": 2.0}
    for source, measured in runs.items():
        sustained = measured[0]
        met = sustained["p95_latency_s"] <= targets[source] and not backlog_grows(sustained)
        top = highest[source]
        lines.append(
            f"- {source}: {args.rate:.0f} events/s for {args.minutes:g} minutes with p95 event → serving latency "
            f"≤ {targets[source]:g} s and no backlog growth: **{'met' if met else 'NOT met'}** "
            f"(p95 {sustained['p95_latency_s']} s). Highest rate measured without backlog growth: "
            f"**{'none' if top is None else f'{top:.0f} events/s'}**.")
    if {"files", "kafka"} <= set(runs):
        kafka, files = highest["kafka"] or 0, highest["files"] or 0
        verdict = "met" if kafka >= files else "NOT met"
        lines.append(f"- Kafka's sustained maximum at least the file source's: **{verdict}** "
                     f"({kafka:.0f} vs {files:.0f} events/s; the ramp stops at its highest rate tried).")
    lines += [
        "",
        f"Lookup (`RecommendationLookup.get`, {lookup['users']:,}-user table, after warm-up, "
        f"{lookup['lookups']:,} lookups incl. ~9% cold-start users): p50 {lookup['p50_ms']} ms, "
        f"**p99 {lookup['p99_ms']} ms** (target ≤ 10 ms: {'met' if lookup['p99_ms'] <= 10 else 'NOT met'}); "
        f"max {lookup['max_ms']} ms; snapshot load {lookup['snapshot_load_s']} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
