"""Helpers of the nearline stream tests: the file source's (test_serving.py) and Kafka's
(test_kafka.py) run the same checks on the tables the stream writes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable

from tests.conftest import QUIET


def table(root: str | Path, name: str) -> pa.Table:
    return DeltaTable(f"{root}/{name}").to_pyarrow_table()


def land(folder: Path, lines: list[str | bytes], name: str) -> None:
    """Publish ``lines`` as one file of the landing folder, whole (hidden name, then renamed)."""
    hidden = folder / f".{name}"
    hidden.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    os.replace(hidden, folder / name)


def stream_process(root: Path, *args: str) -> subprocess.Popen:
    """``recsys stream`` on ``root`` in a process group of its own, until 4 s without new data."""
    return subprocess.Popen(
        [sys.executable, "-m", "recsys_spark.cli", "stream", "--root", str(root), "--format", "jsonl",
         "--until-idle", "4", *args, *QUIET],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_9_mid_run(process: subprocess.Popen, root: Path, *, max_delay: float = 1.5) -> tuple[int, int]:
    """``kill -9`` the stream's process group at a random moment after its first committed
    micro-batch; returns (seed, micro-batches committed). ``RECSYS_TEST_KILL_SEED=<seed>`` repeats
    a run's kill point (the seed is printed)."""
    metrics = root / "ops" / "stream_metrics" / "_delta_log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and not list(metrics.glob("*.json")):
        time.sleep(0.1)
    seed = int(os.environ.get("RECSYS_TEST_KILL_SEED", random.SystemRandom().randrange(2**32)))
    delay = random.Random(seed).uniform(0.0, max_delay)
    print(f"kill -9 {delay:.3f} s after the first committed micro-batch (RECSYS_TEST_KILL_SEED={seed})")
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return seed, len(list(metrics.glob("*.json")))


def snapshot(root: Path) -> dict[str, list]:
    """The stream's tables without micro-batch lineage (batch ids, run ids): after a restart,
    Spark's file source may put files that no micro-batch had claimed yet into a different
    micro-batch than an uninterrupted run would, so lineage may differ while content may not."""
    def rows(name: str, columns: list[str]) -> list:
        records = DeltaTable(str(root / name)).to_pyarrow_table(columns=columns).to_pylist()
        return sorted(json.dumps(r, default=str, sort_keys=True) for r in records)

    return {
        "recommendations": rows("serving/recommendations", ["user_id", "source", "item_ids", "model_version",
                                                            "last_event_ts"]),
        "user_state": rows("serving/user_state", ["user_id", "item_ids", "behaviors", "event_ts", "bought"]),
        "bronze": rows("bronze/events_raw", ["raw", "source_file"]),
        "quarantine": rows("quarantine/events", ["raw", "reason"]),
    }


def assert_lineage_consistent(root: Path, landed: int) -> None:
    """Each micro-batch committed once, its counts match what it wrote, and every nearline list
    comes from its user's latest state."""
    metrics = {r["batch_id"]: r for r in table(root, "ops/stream_metrics").to_pylist()}
    assert sorted(metrics) == list(range(len(metrics)))
    assert sum(r["rows_in"] for r in metrics.values()) == landed

    def per_batch(name: str) -> dict[int, int]:
        counts: dict[int, int] = {}
        for run_id in table(root, name).column("ingest_run_id").to_pylist():
            if run_id.startswith("recsys-nearline-"):  # "recsys-nearline-<query id>-<batch id>"
                batch = int(run_id.rsplit("-", 1)[-1])
                counts[batch] = counts.get(batch, 0) + 1
        return counts

    assert per_batch("bronze/events_raw") == {b: r["rows_in"] for b, r in metrics.items()}
    assert per_batch("quarantine/events") == {b: r["rows_quarantined"] for b, r in metrics.items()
                                              if r["rows_quarantined"]}
    state = {r["user_id"]: r["stream_batch_id"] for r in table(root, "serving/user_state").to_pylist()}
    nearline = {r["user_id"]: r["stream_batch_id"] for r in table(root, "serving/recommendations").to_pylist()
                if r["source"] == "nearline"}
    assert nearline == state
