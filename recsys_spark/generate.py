"""Synthetic e-commerce behaviour logs shaped like Taobao's UserBehavior data: the embedded default.

The generator is vectorised with NumPy and deterministic for a given seed. What makes it
realistic enough to exercise the pipeline and the models:

* a catalogue of categories of Zipf-distributed sizes, and Zipf item popularity within each;
* users with a few category interests that drift from day to day, and different activity levels;
* sessions that start on a diurnal curve, with exponential gaps between events and repeated
  views of the same item;
* a funnel pv -> cart/fav -> buy at Taobao-like rates (about 89% pv, 5.5% cart, 3% fav, 2% buy),
  with repeat purchases of an item rare;
* optionally, realistic bad rows: truncated lines, unknown behaviour types, non-numeric ids,
  empty fields, timestamps far in the future and exact duplicates.

About 5 events per user per day; events are written in time order, one day at a time, so memory
holds one day of events.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from recsys_spark.constants import BEHAVIORS
from recsys_spark.logs import get_logger, log_event

log = get_logger("generate")

OutputFormat = Literal["taobao", "jsonl"]
DEFAULT_START = datetime(2017, 11, 25, tzinfo=UTC)  # the Taobao data set's first day

# Hour-of-day weights of session starts: quiet at night, a lunch bump, an evening peak.
_HOURLY = np.array(
    [3, 2, 1, 1, 1, 1, 2, 3, 4, 5, 6, 6, 7, 6, 6, 6, 6, 6, 7, 8, 9, 10, 9, 6], dtype=float
)
_DAY_SECONDS = 86_400
_YEAR_2100 = 4_102_444_800


@dataclass(frozen=True)
class FunnelRates:
    """Per-page-view probabilities of the follow-up actions (tuned to Taobao's mix)."""

    cart: float = 0.062
    fav: float = 0.034
    buy_after_cart: float = 0.20
    buy_without_cart: float = 0.011
    repeat_buy_kept: float = 0.1  # share of repeat purchases of the same item that survive


@dataclass(frozen=True)
class GeneratorConfig:
    users: int
    items: int
    days: int
    seed: int = 0
    start: datetime = DEFAULT_START
    interests_per_user: int = 5
    mean_session_views: float = 8.0
    mean_gap_seconds: float = 45.0
    repeat_view_rate: float = 0.2
    interest_drift_rate: float = 0.1
    funnel: FunnelRates = field(default_factory=FunnelRates)

    def __post_init__(self) -> None:
        for name in ("users", "items", "days"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class GenerationReport:
    path: str
    format: str
    events: int
    malformed: int
    behavior_counts: dict[str, int]
    files: int = 1

    @property
    def lines(self) -> int:
        return self.events + self.malformed


class _Catalogue:
    """Items grouped by category with Zipf popularity, plus the raw ids written to the log."""

    def __init__(self, cfg: GeneratorConfig, rng: np.random.Generator) -> None:
        n_categories = min(cfg.items, max(5, cfg.items // 150))
        category_weight = 1.0 / np.arange(1, n_categories + 1) ** 0.9
        category_weight /= category_weight.sum()
        # Every category gets at least one item; the rest follow the Zipf sizes.
        sizes = 1 + rng.multinomial(cfg.items - n_categories, category_weight)
        self.n_categories = n_categories
        self.item_category = np.repeat(np.arange(n_categories), sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        # Popularity within a category: Zipf over a random rank order.
        ranks = np.empty(cfg.items)
        for c in range(n_categories):
            lo, hi = self.offsets[c], self.offsets[c + 1]
            ranks[lo:hi] = rng.permutation(hi - lo) + 1
        weight = 1.0 / ranks**1.1
        cum = np.empty(cfg.items)
        for c in range(n_categories):
            lo, hi = self.offsets[c], self.offsets[c + 1]
            cw = np.cumsum(weight[lo:hi])
            cum[lo:hi] = c + cw / cw[-1]
        self.cumulative = cum  # category c's items cover (c, c+1]
        self.category_popularity = sizes / sizes.sum()
        self.item_ids = _sparse_ids(rng, cfg.items, start=1)
        self.category_ids = _sparse_ids(rng, n_categories, start=1)

    def sample_items(self, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        target = categories + rng.random(categories.size)
        return np.minimum(np.searchsorted(self.cumulative, target), self.cumulative.size - 1)


def _sparse_ids(rng: np.random.Generator, n: int, *, start: int) -> np.ndarray:
    """``n`` distinct increasing ids spread over a range about 1.5x larger, like real id spaces."""
    return np.sort(rng.choice(int(n * 1.5) + 10, size=n, replace=False)) + start


class _Users:
    def __init__(self, cfg: GeneratorConfig, catalogue: _Catalogue, rng: np.random.Generator) -> None:
        k = cfg.interests_per_user
        self.interests = rng.choice(
            catalogue.n_categories, size=(cfg.users, k), p=catalogue.category_popularity
        )
        weights = rng.dirichlet(np.full(k, 0.6), size=cfg.users)
        self.cum_weights = np.cumsum(weights, axis=1)
        self.activity = rng.beta(1.2, 2.0, size=cfg.users)  # chance of being active on a day
        self.ids = _sparse_ids(rng, cfg.users, start=1)

    def drift(self, cfg: GeneratorConfig, catalogue: _Catalogue, rng: np.random.Generator) -> None:
        """Some users swap one interest for a new category: tastes move over time."""
        movers = np.flatnonzero(rng.random(cfg.users) < cfg.interest_drift_rate)
        slots = rng.integers(0, cfg.interests_per_user, movers.size)
        self.interests[movers, slots] = rng.choice(
            catalogue.n_categories, size=movers.size, p=catalogue.category_popularity
        )


def generate_events(cfg: GeneratorConfig) -> Iterator[pd.DataFrame]:
    """Yield one DataFrame of clean events per day, in time order.

    Columns: user_id, item_id, category_id, behavior_type, timestamp (Unix seconds).
    """
    root = np.random.SeedSequence(cfg.seed)
    setup_seed, *day_seeds = root.spawn(cfg.days + 1)
    setup = np.random.default_rng(setup_seed)
    catalogue = _Catalogue(cfg, setup)
    users = _Users(cfg, catalogue, setup)
    bought = np.empty(0, dtype=np.int64)
    for day in range(cfg.days):
        rng = np.random.default_rng(day_seeds[day])
        if day:
            users.drift(cfg, catalogue, rng)
        events = _one_day(cfg, catalogue, users, rng, day)
        events, bought = _thin_repeat_purchases(cfg, events, bought, rng)
        order = np.argsort(events["timestamp"], kind="stable")
        day_start = int(cfg.start.timestamp()) + day * _DAY_SECONDS
        yield pd.DataFrame(
            {
                "user_id": users.ids[events["user"][order]],
                "item_id": catalogue.item_ids[events["item"][order]],
                "category_id": catalogue.category_ids[catalogue.item_category[events["item"][order]]],
                "behavior_type": np.asarray(BEHAVIORS)[events["behavior"][order]],
                "timestamp": day_start + events["timestamp"][order],
            }
        )


def _one_day(
    cfg: GeneratorConfig, catalogue: _Catalogue, users: _Users, rng: np.random.Generator, day: int
) -> dict[str, np.ndarray]:
    active = np.flatnonzero(rng.random(cfg.users) < users.activity)
    sessions_per_user = 1 + rng.poisson(0.4, active.size)
    session_user = np.repeat(active, sessions_per_user)
    n_sessions = session_user.size
    hours = rng.choice(24, size=n_sessions, p=_HOURLY / _HOURLY.sum())
    session_start = hours * 3600 + rng.integers(0, 3600, n_sessions)
    views = rng.geometric(1.0 / cfg.mean_session_views, n_sessions)

    # One row per page view: session index, position in session, time.
    session = np.repeat(np.arange(n_sessions), views)
    first = np.cumsum(views) - views
    position = np.arange(session.size) - np.repeat(first, views)
    gaps = np.where(position == 0, 0.0, rng.exponential(cfg.mean_gap_seconds, session.size))
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first], views)
    ts = session_start[session] + elapsed.astype(np.int64)
    user = session_user[session]

    # Category: the session's interest, sometimes switching to another of the user's interests.
    session_slot = _pick_slot(users.cum_weights[session_user], rng)
    slot = session_slot[session]
    switch = rng.random(session.size) < 0.15
    slot[switch] = _pick_slot(users.cum_weights[user[switch]], rng)
    category = users.interests[user, slot]
    item = catalogue.sample_items(category, rng)
    # Repeated views of the previous item: carry the last fresh item forward within the session.
    repeat = (rng.random(session.size) < cfg.repeat_view_rate) & (position > 0)
    source = np.maximum.accumulate(np.where(repeat, 0, np.arange(session.size)))
    item = item[source]

    f = cfg.funnel
    carted = rng.random(item.size) < f.cart
    faved = rng.random(item.size) < f.fav
    buy_p = np.where(carted, f.buy_after_cart, f.buy_without_cart)
    bought = rng.random(item.size) < buy_p
    cart_ts = ts + 1 + rng.exponential(30, item.size).astype(np.int64)
    fav_ts = ts + 1 + rng.exponential(30, item.size).astype(np.int64)
    buy_ts = np.where(carted, cart_ts, ts) + 1 + rng.exponential(120, item.size).astype(np.int64)

    parts = [
        (user, item, np.zeros(item.size, np.int8), ts),
        (user[carted], item[carted], np.full(carted.sum(), 1, np.int8), cart_ts[carted]),
        (user[faved], item[faved], np.full(faved.sum(), 2, np.int8), fav_ts[faved]),
        (user[bought], item[bought], np.full(bought.sum(), 3, np.int8), buy_ts[bought]),
    ]
    out = {
        key: np.concatenate([p[i] for p in parts])
        for i, key in enumerate(("user", "item", "behavior", "timestamp"))
    }
    # Sessions running past midnight stay on this day's file: clip to the day, as a daily dump would.
    out["timestamp"] = np.minimum(out["timestamp"], _DAY_SECONDS - 1)
    log_event(log, "generate.day", day=day, active_users=int(active.size), events=int(out["user"].size))
    return out


def _pick_slot(cum_weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    draws = rng.random((cum_weights.shape[0], 1))
    return np.minimum((cum_weights < draws).sum(axis=1), cum_weights.shape[1] - 1)


def _thin_repeat_purchases(
    cfg: GeneratorConfig, events: dict[str, np.ndarray], bought: np.ndarray, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Drop most purchases of an item the user already bought (today or on an earlier day)."""
    is_buy = events["behavior"] == 3
    keys = events["user"].astype(np.int64) * cfg.items + events["item"]
    buy_idx = np.flatnonzero(is_buy)
    buy_idx = buy_idx[np.argsort(events["timestamp"][buy_idx], kind="stable")]
    buy_keys = keys[buy_idx]
    _, first = np.unique(buy_keys, return_index=True)
    repeat = np.ones(buy_idx.size, bool)
    repeat[first] = False
    repeat |= np.isin(buy_keys, bought)
    drop = buy_idx[repeat & (rng.random(buy_idx.size) >= cfg.funnel.repeat_buy_kept)]
    keep = np.ones(keys.size, bool)
    keep[drop] = False
    kept = {k: v[keep] for k, v in events.items()}
    bought = np.union1d(bought, buy_keys)
    return kept, bought


# --- writing ---------------------------------------------------------------------------------


def write_log(
    cfg: GeneratorConfig,
    out: str | Path,
    *,
    fmt: OutputFormat = "taobao",
    malformed_rate: float = 0.0,
    daily: bool = False,
) -> GenerationReport:
    """Generate ``cfg``'s events into ``out`` as a Taobao CSV (no header) or JSON lines.

    ``daily``: ``out`` is a folder that gets one folder per day, ``date=YYYY-MM-DD/events.csv``
    (or ``.jsonl``), the way a daily export lands for a scheduler to pick up day by day.
    """
    if not 0 <= malformed_rate < 1:
        raise ValueError(f"malformed_rate must be in [0, 1), got {malformed_rate}")
    if fmt not in ("taobao", "jsonl"):
        raise ValueError(f"unknown output format {fmt!r}; use taobao or jsonl")
    path = Path(out)
    if daily and path.is_file():
        raise ValueError(f"{path} is a file; --daily writes a folder of day folders")
    bad_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7919]))
    counts = dict.fromkeys(BEHAVIORS, 0)
    tally = {"events": 0, "malformed": 0, "files": 0}

    def days() -> Iterator[tuple[int, list[bytes]]]:
        for day, frame in enumerate(generate_events(cfg)):
            lines = _render(frame, fmt, day, cfg.seed)
            if malformed_rate > 0:
                lines, n_bad = _inject_malformed(lines, frame, fmt, malformed_rate, bad_rng)
                tally["malformed"] += n_bad
            tally["events"] += len(frame)
            for behavior, n in frame["behavior_type"].value_counts().items():
                counts[str(behavior)] += int(n)
            yield day, lines

    if daily:
        for day, lines in days():
            if lines:  # a day without events gets no folder: nothing arrived that day
                date = (cfg.start + timedelta(days=day)).date().isoformat()
                _write_atomically(path / f"date={date}" / f"events.{_EXTENSIONS[fmt]}", [lines])
                tally["files"] += 1
    else:
        _write_atomically(path, (lines for _, lines in days()))
        tally["files"] = 1
    report = GenerationReport(str(path), fmt, tally["events"], tally["malformed"], counts, tally["files"])
    log_event(log, "generate.done", path=str(path), format=fmt, events=report.events,
              malformed=report.malformed, files=report.files)
    return report


_EXTENSIONS: dict[str, str] = {"taobao": "csv", "jsonl": "jsonl"}


def _write_atomically(path: Path, chunks: Iterable[list[bytes]]) -> None:
    """Write chunks of lines to ``path`` through a hidden ``.partial`` file renamed at the end:
    a crash never leaves a half-written log under the final name, and ingest (which skips
    names starting with ``.``) never reads one that is still being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("wb") as sink:
            for lines in chunks:
                if lines:  # a day without events adds no (blank) line
                    sink.write(b"\n".join(lines) + b"\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _render(frame: pd.DataFrame, fmt: OutputFormat, day: int, seed: int) -> list[bytes]:
    if fmt == "taobao":
        buffer = io.BytesIO()
        pacsv.write_csv(
            pa.Table.from_pandas(frame, preserve_index=False),
            buffer,
            write_options=pacsv.WriteOptions(include_header=False, quoting_style="none"),
        )
        return buffer.getvalue().splitlines()
    n = len(frame)
    sequence = np.arange(n)
    records = pd.DataFrame(
        {
            "event_id": [f"{seed:x}-{day:03d}-{i:08x}" for i in sequence],
            "user_id": frame["user_id"].to_numpy(),
            "item_id": frame["item_id"].to_numpy(),
            "category_id": frame["category_id"].to_numpy(),
            "behavior_type": frame["behavior_type"].to_numpy(),
            "ts": frame["timestamp"].to_numpy() * 1000,  # collectors usually emit epoch millis
            "device": np.asarray(["ios", "android", "web"])[frame["user_id"].to_numpy() % 3],
        }
    )
    text = records.to_json(orient="records", lines=True)
    return text.encode().splitlines()


_BAD_KINDS = ("truncated", "unknown_behavior", "non_numeric_id", "empty_field", "future", "duplicate")


def _inject_malformed(
    lines: list[bytes], frame: pd.DataFrame, fmt: OutputFormat, rate: float, rng: np.random.Generator
) -> tuple[list[bytes], int]:
    """Insert about ``rate * len(lines)`` bad rows after randomly chosen good ones."""
    n_bad = rng.binomial(len(lines), rate)
    if n_bad == 0:
        return lines, 0
    after = np.sort(rng.integers(0, len(lines), n_bad))
    kinds = rng.integers(0, len(_BAD_KINDS), n_bad)
    out: list[bytes] = []
    start = 0
    for position, kind in zip(after.tolist(), kinds.tolist(), strict=True):
        out.extend(lines[start : position + 1])
        start = position + 1
        out.append(_corrupt(lines[position], frame.iloc[position], fmt, _BAD_KINDS[kind], rng))
    out.extend(lines[start:])
    return out, n_bad


def _corrupt(line: bytes, row: pd.Series, fmt: OutputFormat, kind: str, rng: np.random.Generator) -> bytes:
    if kind == "duplicate":
        return line
    if kind == "truncated":
        return line[: max(1, int(len(line) * rng.uniform(0.2, 0.7)))]
    fields = {
        "user_id": str(row["user_id"]),
        "item_id": str(row["item_id"]),
        "category_id": str(row["category_id"]),
        "behavior_type": str(row["behavior_type"]),
        "ts": str(int(row["timestamp"])),
    }
    if kind == "unknown_behavior":
        fields["behavior_type"] = str(rng.choice(["click", "share", "PV?", "refund"]))
    elif kind == "non_numeric_id":
        key = str(rng.choice(["user_id", "item_id"]))
        fields[key] = f"u{fields[key]}x" if key == "user_id" else f"{fields[key]}-NaN"
    elif kind == "empty_field":
        fields[str(rng.choice(["user_id", "item_id", "behavior_type", "ts"]))] = ""
    elif kind == "future":
        # Clock bugs put events decades ahead: after 2100-01-01, beyond any ingest's horizon.
        fields["ts"] = str(_YEAR_2100 + int(rng.integers(0, 80 * 365 * _DAY_SECONDS)))
    if fmt == "taobao":
        return ",".join(fields.values()).encode()
    record: dict[str, object] = {k: v for k, v in fields.items() if v != ""}
    for key in ("user_id", "item_id", "category_id", "ts"):
        if key in record and str(record[key]).isdigit():
            record[key] = int(str(record[key])) * (1000 if key == "ts" else 1)
    return json.dumps(record).encode()
