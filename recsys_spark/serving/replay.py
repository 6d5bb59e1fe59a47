"""``recsys replay``: play a behaviour log into a landing folder, as collectors would.

Events are written in event-time order, in small files (one per tick), each published atomically
(written under a hidden name, then renamed: Spark's file source ignores names starting with
``.``). Pace: a steady ``rate`` in events per second, or the log's own timing sped up ``speedup``
times. By default each event's timestamp is rewritten to the moment it is published, so the
stream's event-time latency measures the platform, not the age of the log; ``keep_time`` keeps the
original times. Lines that cannot be parsed are passed through untouched (the stream quarantines
them), in their original position.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from recsys_spark.errors import InputDataError

TICK_SECONDS = 0.5
MAX_SECONDS = 366 * 86_400


@dataclass
class ReplayReport:
    events: int
    files: int
    seconds: float
    landing: str

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


# Times outside these bounds are what ingest quarantines (timestamp_out_of_range).
_EARLIEST = 946_684_800.0  # 2000-01-01
_LATEST_AHEAD = 86_400.0  # a day after now


def _event_time(line: str, fmt: str) -> float | None:
    """The line's event time in Unix seconds, or None when the stream would reject the line's
    time (unparseable, out of range, or a JSON object it calls malformed): such lines are
    published unchanged and never drive the pace."""
    try:
        if fmt == "taobao":
            seconds = float(line.split(",")[4])
        else:
            value = json.loads(line, object_pairs_hook=_unique_keys)["ts"]
            if isinstance(value, str) and not value.strip().replace(".", "", 1).isdigit():
                moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
                seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
            elif isinstance(value, bool):
                return None
            else:
                seconds = float(value)
                seconds = seconds / 1000 if seconds > 1e11 else seconds
    except (IndexError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if not _EARLIEST <= seconds <= time.time() + _LATEST_AHEAD:
        return None
    return seconds


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("repeated key")
    return dict(pairs)


def _retimed(line: str, fmt: str, now: float) -> str:
    if fmt == "taobao":
        fields = line.split(",")
        fields[4] = str(int(now))
        return ",".join(fields)
    event = json.loads(line)
    event["ts"] = int(now * 1000)
    return json.dumps(event, separators=(",", ":"))


def read_events(path: Path, fmt: str, limit: int | None = None) -> list[tuple[float, int, str]]:
    """(event time, original position, line), ordered by time; unparseable lines keep the time of
    the line before them."""
    if fmt not in ("taobao", "jsonl"):
        raise InputDataError(f"replay supports taobao and jsonl, not {fmt!r}")
    if not path.is_file():
        raise InputDataError(f"replay input {path} does not exist")
    events: list[tuple[float, int, str]] = []
    last: float | None = None
    leading: list[tuple[int, str]] = []  # bad lines before the first good time
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for position, line in enumerate(handle):
            if limit is not None and position >= limit:
                break
            line = line.rstrip("\n")
            if not line:
                continue
            when = _event_time(line, fmt)
            last = when if when is not None else last
            if last is None:
                leading.append((position, line))
            else:
                events.append((last, position, line))
    if not events and not leading:
        raise InputDataError(f"replay input {path} holds no lines")
    first = events[0][0] if events else 0.0
    events = [(first, position, line) for position, line in leading] + events
    events.sort(key=lambda e: (e[0], e[1]))
    return events


def _ticks(events: list[tuple[float, int, str]], rate: float | None, speedup: float | None
           ) -> Iterator[tuple[float, list[tuple[float, int, str]]]]:
    """(offset in seconds from the start, events to publish then)."""
    if speedup is not None:
        start = events[0][0]
        batch: list[tuple[float, int, str]] = []
        due = 0.0
        for event in events:
            offset = (event[0] - start) / speedup
            if batch and offset >= due + TICK_SECONDS:
                yield due, batch
                batch, due = [], offset
            batch.append(event)
        if batch:
            yield due, batch
        return
    per_tick = max(1, round((rate or 100) * TICK_SECONDS))
    for tick, start in enumerate(range(0, len(events), per_tick)):
        yield tick * per_tick / (rate or 100), events[start : start + per_tick]


def replay(
    input_path: str | Path,
    fmt: str,
    landing: str | Path,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    keep_time: bool = False,
    limit: int | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayReport:
    paces = [p for p in (rate, speedup) if p is not None]
    if len(paces) != 1:
        raise InputDataError("give exactly one of --rate and --speedup")
    pace = paces[0]
    if not (math.isfinite(pace) and pace > 0):
        raise InputDataError("--rate and --speedup must be positive finite numbers")
    events = read_events(Path(input_path), fmt, limit)
    duration = len(events) / pace if rate is not None else (events[-1][0] - events[0][0]) / pace
    if duration > MAX_SECONDS:  # a typo such as 1e-3 for 1e3; sleeps that long also overflow
        raise InputDataError(f"at this pace the replay would take {duration / 86_400:.3g} days "
                             f"(more than {MAX_SECONDS // 86_400} allowed): raise --rate or --speedup")
    folder = Path(landing)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "csv" if fmt == "taobao" else "jsonl"
    started = clock()
    run = uuid.uuid4().hex[:8]
    files = 0
    for offset, batch in _ticks(events, rate, speedup):
        wait = started + offset - clock()
        if wait > 0:
            sleep(wait)
        now = clock()
        lines = [line if keep_time or _event_time(line, fmt) is None else _retimed(line, fmt, now)
                 for _, _, line in batch]
        name = f"events-{int(started)}-{run}-{files:07d}.{suffix}"  # run: replays started together
        hidden = folder / f".{name}.tmp"
        hidden.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
        os.replace(hidden, folder / name)  # atomic: the stream never sees half a file
        files += 1
    return ReplayReport(len(events), files, max(clock() - started, 1e-9), str(folder))
