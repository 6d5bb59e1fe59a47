"""One nearline query per checkpoint, and what a scheduler needs to know about it.

A query holds an exclusive lock (``fcntl.flock``) on ``<checkpoint>.lock`` for as long as it
runs, and the lock file says who holds it (pid, host, start time, phase). A second query on the
same checkpoint is refused at once instead of racing the first for its micro-batches. The kernel
drops the lock when its holder dies, so a crashed query leaves no stale lock behind. A remote
checkpoint (a URI) is not locked: there the orchestrator alone must not start a second query.

``stream_health`` (``recsys stream-status``) tells whether a query holds the lock and sums up
the micro-batches of a recent window of ``ops/stream_metrics``: latency, quarantine rate and
the age of the newest batch.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pyarrow.compute as pc

from recsys_spark.constants import OPS_STREAM_METRICS
from recsys_spark.errors import StreamAlreadyRunningError, TableNotFoundError
from recsys_spark.logs import get_logger, log_event
from recsys_spark.storage import read_table

log = get_logger("stream")

LOCK_SUFFIX = ".lock"


def lock_path(checkpoint: str) -> Path | None:
    """``<checkpoint>.lock`` beside the checkpoint folder (None for a remote checkpoint)."""
    return None if "://" in checkpoint else Path(checkpoint + LOCK_SUFFIX)


@contextmanager
def hold_query_lock(checkpoint: str) -> Iterator[Callable[[str], None]]:
    """Hold the checkpoint's lock while the block runs; yields a function that records the
    query's phase (``starting``, then ``running``) in the lock file.

    Raises:
        StreamAlreadyRunningError: another query holds it.
    """
    path = lock_path(checkpoint)
    if path is None:
        log_event(log, "stream.lock_skipped", checkpoint=checkpoint, reason="remote checkpoint")
        yield lambda phase: None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(path) or {}
            raise StreamAlreadyRunningError(
                f"a nearline query already runs on checkpoint {checkpoint} (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('started_at', '?')}): stop it first, or give "
                "this one another serving.stream.checkpoint"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started_at": datetime.now(UTC).isoformat(), "checkpoint": checkpoint}

        def record_phase(phase: str) -> None:
            _write_holder(handle, holder | {"phase": phase})

        record_phase("starting")
        try:
            yield record_phase
        finally:
            handle.truncate(0)  # nobody holds it any more
            fcntl.flock(handle, fcntl.LOCK_UN)


def query_holder(checkpoint: str) -> dict[str, Any] | None:
    """The record of the query holding the checkpoint's lock, or None when none runs."""
    path = lock_path(checkpoint)
    if path is None or not path.is_file():
        return None
    with path.open("r") as handle:
        try:  # a shared lock is refused only while a query holds the exclusive one
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(path) or {"checkpoint": checkpoint}
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _write_holder(handle: IO[str], record: dict[str, Any]) -> None:
    handle.truncate(0)  # opened for appending: the record is the whole file
    handle.write(json.dumps(record))
    handle.flush()


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):  # caught between the truncate and the write
        return None


def stream_health(root: str, checkpoint: str, *, window: timedelta, now: datetime | None = None) -> dict[str, Any]:
    """Whether a query runs on ``checkpoint``, and its micro-batches committed within
    ``window`` before ``now``: rows, quarantine rate, the worst batch's p95 latency, and how old
    the newest batch is (counted from the query's start when it has committed none since)."""
    now = now or datetime.now(UTC)
    holder = query_holder(checkpoint)
    try:
        metrics = read_table(root, OPS_STREAM_METRICS, columns=[
            "committed_at", "rows_in", "rows_quarantined", "latency_p95_s"])
    except TableNotFoundError:
        metrics = None
    last_batch = None if metrics is None or metrics.num_rows == 0 else pc.max(metrics["committed_at"]).as_py()
    recent = None if metrics is None else metrics.filter(pc.field("committed_at") >= now - window)
    rows_in = 0 if recent is None else int(pc.sum(recent["rows_in"]).as_py() or 0)
    quarantined = 0 if recent is None else int(pc.sum(recent["rows_quarantined"]).as_py() or 0)
    p95 = None if recent is None else pc.max(recent["latency_p95_s"]).as_py()
    started = datetime.fromisoformat(holder["started_at"]) if holder and "started_at" in holder else None
    since = max((t for t in (last_batch, started) if t is not None), default=None)
    return {
        "running": holder is not None,
        "holder": holder,
        "checkpoint": checkpoint,
        "window_seconds": window.total_seconds(),
        "batches": 0 if recent is None else recent.num_rows,
        "rows_in": rows_in,
        "rows_quarantined": quarantined,
        "quarantine_rate": quarantined / rows_in if rows_in else None,
        "latency_p95_s": p95,  # the worst micro-batch's p95 in the window
        "last_batch_at": None if last_batch is None else last_batch.isoformat(),
        "seconds_since_last_batch": None if since is None else round((now - since).total_seconds(), 1),
    }
