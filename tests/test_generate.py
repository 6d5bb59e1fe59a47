from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from recsys_spark.generate import GeneratorConfig, generate_events, write_log

SMALL = GeneratorConfig(users=1500, items=800, days=4, seed=3)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = write_log(SMALL, tmp_path / "a.csv", malformed_rate=0.02)
    b = write_log(SMALL, tmp_path / "b.csv", malformed_rate=0.02)
    c = write_log(GeneratorConfig(users=1500, items=800, days=4, seed=4), tmp_path / "c.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()
    assert a.lines == b.lines == a.events + a.malformed
    assert c.malformed == 0


def test_behaviour_mix_is_taobao_like() -> None:
    frame = pd.concat(generate_events(GeneratorConfig(users=4000, items=2000, days=5, seed=1)))
    share = frame["behavior_type"].value_counts(normalize=True)
    assert share["pv"] == pytest.approx(0.89, abs=0.02)
    assert share["cart"] == pytest.approx(0.055, abs=0.01)
    assert share["fav"] == pytest.approx(0.03, abs=0.01)
    assert share["buy"] == pytest.approx(0.02, abs=0.007)


def test_events_are_time_ordered_and_days_advance() -> None:
    days = list(generate_events(SMALL))
    assert len(days) == SMALL.days
    for day in days:
        assert day["timestamp"].is_monotonic_increasing
    assert days[1]["timestamp"].min() > days[0]["timestamp"].max() - 1


def test_item_popularity_is_skewed_and_repeat_purchases_rare() -> None:
    frame = pd.concat(generate_events(GeneratorConfig(users=4000, items=2000, days=5, seed=2)))
    views = frame[frame["behavior_type"] == "pv"]["item_id"].value_counts()
    top_share = views.head(len(views) // 10).sum() / views.sum()
    assert top_share > 0.3  # the top 10% of items draw far more than 10% of views
    buys = frame[frame["behavior_type"] == "buy"]
    repeats = buys.duplicated(["user_id", "item_id"]).mean()
    assert repeats < 0.05


def test_user_interests_concentrate_on_few_categories() -> None:
    frame = pd.concat(generate_events(SMALL))
    per_user = frame.groupby("user_id")["category_id"].agg(["nunique", "size"])
    heavy = per_user[per_user["size"] >= 30]
    assert (heavy["nunique"] < heavy["size"] / 3).mean() > 0.9


def test_malformed_rows_cover_every_kind(tmp_path: Path) -> None:
    report = write_log(SMALL, tmp_path / "bad.csv", malformed_rate=0.05)
    lines = (tmp_path / "bad.csv").read_text().splitlines()
    assert len(lines) == report.lines
    fields = [line.split(",") for line in lines]
    assert any(len(f) != 5 for f in fields)  # truncated
    five = [f for f in fields if len(f) == 5]
    assert any(f[3] not in {"pv", "cart", "fav", "buy"} for f in five)
    assert any(not f[0].isdigit() or not f[1].isdigit() for f in five if all(f))
    assert any("" in f for f in five)
    assert any(f[4].isdigit() and int(f[4]) > 4_102_444_800 for f in five)
    assert max(Counter(lines).values()) > 1  # exact duplicates


def test_jsonl_lines_parse_and_carry_event_ids(tmp_path: Path) -> None:
    write_log(SMALL, tmp_path / "e.jsonl", fmt="jsonl")
    records = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert {"event_id", "user_id", "item_id", "behavior_type", "ts", "device"} <= set(records[0])
    assert len({r["event_id"] for r in records}) == len(records)
    assert records[0]["ts"] > 1e12  # epoch milliseconds


@pytest.mark.parametrize("bad", [{"users": 0}, {"days": -1}])
def test_invalid_sizes_are_rejected(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        GeneratorConfig(**{"users": 10, "items": 10, "days": 1, **bad})


@pytest.mark.parametrize("seed", range(6))
def test_tiny_logs_generate(tmp_path: Path, seed: int) -> None:
    # A day on which no user is active must not break the session arithmetic.
    report = write_log(GeneratorConfig(users=5, items=10, days=2, seed=seed), tmp_path / "tiny.csv")
    assert report.events == len((tmp_path / "tiny.csv").read_text().splitlines())


def test_unwritable_output_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    with pytest.raises(OSError):
        write_log(GeneratorConfig(users=20, items=10, days=1, seed=0), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("fmt", ["taobao", "jsonl"])
def test_daily_folders_hold_the_same_log_split_by_event_date(tmp_path: Path, fmt: str) -> None:
    single = write_log(SMALL, tmp_path / "all", fmt=fmt, malformed_rate=0.02)
    daily = write_log(SMALL, tmp_path / "days", fmt=fmt, malformed_rate=0.02, daily=True)
    folders = sorted(p.name for p in (tmp_path / "days").iterdir())
    assert folders == [f"date=2017-11-{25 + d}" for d in range(SMALL.days)]
    extension = "csv" if fmt == "taobao" else "jsonl"
    files = [tmp_path / "days" / f / f"events.{extension}" for f in folders]
    assert [sorted(p.name for p in f.parent.iterdir()) for f in files] == [[f"events.{extension}"]] * SMALL.days
    assert b"".join(f.read_bytes() for f in files) == (tmp_path / "all").read_bytes()
    assert (daily.files, daily.events, daily.malformed) == (SMALL.days, single.events, single.malformed)
    clean = write_log(SMALL, tmp_path / "clean", fmt=fmt, daily=True)
    for folder in folders:  # every event of a day folder happened on that date (UTC)
        lines = (tmp_path / "clean" / folder / f"events.{extension}").read_text().splitlines()
        seconds = ([int(line.split(",")[4]) for line in lines] if fmt == "taobao"
                   else [json.loads(line)["ts"] // 1000 for line in lines])
        dates = {pd.Timestamp(s, unit="s").date().isoformat() for s in seconds}
        assert dates == {folder.removeprefix("date=")}
    assert clean.events == single.events


def test_daily_into_an_existing_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("x\n")
    with pytest.raises(ValueError, match="is a file"):
        write_log(SMALL, tmp_path / "log.csv", daily=True)
    assert (tmp_path / "log.csv").read_text() == "x\n"
