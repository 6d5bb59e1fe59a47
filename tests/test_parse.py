from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pyspark.sql import functions as F

from recsys_spark.ingest.parse import PARSED_COLUMNS, ValidationRules, parse_lines

pytestmark = pytest.mark.spark

RULES = ValidationRules(
    min_time=datetime(2000, 1, 1, tzinfo=UTC),
    max_time=datetime(2026, 1, 1, tzinfo=UTC),
    sequence_base_time=datetime(2020, 1, 1, tzinfo=UTC),
    sequence_step_seconds=3600,
    max_line_bytes=1024,
)
T0 = 1511539200  # 2017-11-24T16:00:00Z


def parse(spark, fmt: str, lines: list[str]) -> list[dict]:
    raw = spark.createDataFrame([(line, "f.txt") for line in lines], "raw string, source_file string")
    parsed = parse_lines(raw, fmt, RULES).withColumn("event_ts", F.unix_seconds("event_ts"))
    return [row.asDict() for row in parsed.collect()]


TAOBAO_CASES = [
        (f"1,2,3,pv,{T0}", None, None),
        (f" 1 , 2 , 3 , BUY , {T0} ", None, None),
        # Only spaces are padding: a tab is kept and makes the field invalid, with the reason shown.
        (f"1\t,2,3,pv,{T0}", "invalid_id", "user_id=1\t"),
        (f"1,2,3,pv\t,{T0}", "unknown_behavior", "behavior_type=pv\t"),
        ("1,2,3,pv", "wrong_field_count", "expected 5 fields, got 4"),
        (f"1,2,3,pv,{T0},x", "wrong_field_count", "expected 5 fields, got 6"),
        ("", "wrong_field_count", "expected 5 fields, got 1"),
        (f"1,,3,pv,{T0}", "missing_field", "empty item_id"),
        ("1,2,3,pv,", "missing_field", "empty timestamp"),
        (f"u1,2,3,pv,{T0}", "invalid_id", "user_id=u1"),
        (f"1,-2,3,pv,{T0}", "invalid_id", "item_id=-2"),
        (f"1,2,3.5,pv,{T0}", "invalid_id", "category_id=3.5"),
        (f"1,2,99999999999999999999,pv,{T0}", "invalid_id", None),
        (f"1,2,9223372036854775808,pv,{T0}", "invalid_id", None),  # the largest long + 1
        (f"1,2,3,click,{T0}", "unknown_behavior", "behavior_type=click"),
        ("1,2,3,pv,yesterday", "invalid_timestamp", "timestamp=yesterday"),
        ("1,2,3,pv,1511539200000", "invalid_timestamp", None),
        ("1,2,3,pv,15", "timestamp_out_of_range", None),
        ("1,2,3,pv,4102444800", "timestamp_out_of_range", None),
]


@pytest.fixture(scope="module")
def taobao_rows(spark) -> dict[str, dict]:
    """Every taobao case parsed in one Spark job, by raw line."""
    return {r["raw"]: r for r in parse(spark, "taobao", [line for line, _, _ in TAOBAO_CASES])}


@pytest.mark.parametrize(("line", "reason", "detail"), TAOBAO_CASES)
def test_taobao_reasons(taobao_rows, line: str, reason: str | None, detail: str | None) -> None:
    row = taobao_rows[line]
    assert row["reason"] == reason
    if detail is not None:
        assert row["detail"] == detail
    if reason is None:
        assert (row["user_id"], row["item_id"], row["category_id"]) == (1, 2, 3)
        assert row["behavior_type"] in {"pv", "buy"}
        assert row["event_ts"] == T0


def test_ids_up_to_the_largest_long_are_valid(spark) -> None:
    (row,) = parse(spark, "taobao", [f"9223372036854775807,1000000000000000000,3,pv,{T0}"])
    assert row["reason"] is None
    assert (row["user_id"], row["item_id"]) == (2**63 - 1, 10**18)


def test_parsed_columns_and_types(spark) -> None:
    raw = spark.createDataFrame([(f"1,2,3,pv,{T0}", "f")], "raw string, source_file string")
    parsed = parse_lines(raw, "taobao", RULES)
    assert tuple(parsed.columns) == PARSED_COLUMNS
    types = dict(parsed.dtypes)
    assert types["user_id"] == types["item_id"] == "bigint"
    assert types["event_ts"] == "timestamp"
    assert types["extras"] == "map<string,string>"
    (epoch,) = parsed.selectExpr("unix_seconds(event_ts)").first()
    assert epoch == T0


JSONL_CASES = [
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200}', None, T0),
        ('{"user_id":"1","item_id":"2","behavior_type":"PV","ts":1511539200000}', None, T0),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200.5}', None, T0),
        ('{"user_id":" 1 ","item_id":2,"behavior_type":"pv ","ts":" 1511539200"}', None, T0),
        ('{"user_id":"1\\t","item_id":2,"behavior_type":"pv","ts":1511539200}', "invalid_id", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":"2017-11-25T00:00:00+08:00"}', None, T0),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":"2017-11-24T16:00:00Z"}', None, T0),
        ('{"user_id":1,"item_id":2', "malformed_json", None),
        ("[1, 2]", "malformed_json", None),
        ("", "malformed_json", None),
        # A repeated key is ambiguous (Spark's JSON map would keep both and lookups see the first).
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200,"user_id":3}', "malformed_json", None),
        # Spark's JSON reader stops after the first value: a second object on the line (a lost
        # newline) or trailing text would otherwise vanish without a trace.
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200}{"user_id":3,"item_id":4}',
         "malformed_json", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200} x', "malformed_json", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200},', "malformed_json", None),
        # A stray closing bracket or brace after the object (Spark's reader ignores both).
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200}}', "malformed_json", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200} }', "malformed_json", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200}]', "malformed_json", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200,"ctx":{"k":1}}}', "malformed_json", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200}\t', None, T0),
        # Braces inside strings and nested objects are not "after the object".
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200,"q":"}{","ctx":{"k":1}}', None, T0),
        ('{"item_id":2,"behavior_type":"pv","ts":1511539200}', "missing_field", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv"}', "missing_field", None),
        ('{"user_id":"abc","item_id":2,"behavior_type":"pv","ts":1511539200}', "invalid_id", None),
        ('{"user_id":1,"item_id":2,"category_id":"x","behavior_type":"pv","ts":1}', "invalid_id", None),
        # Java's "$" would also match before a trailing newline: ids and times must end there.
        ('{"user_id":"5\\n","item_id":2,"behavior_type":"pv","ts":1511539200}', "invalid_id", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":"1511539200\\n"}', "invalid_timestamp", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"like","ts":1511539200}', "unknown_behavior", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":"soon"}', "invalid_timestamp", None),
        # A time without a date would be read as today's date: a guess, so it is rejected.
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":"16:00"}', "invalid_timestamp", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":"T16:00:00Z"}', "invalid_timestamp", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":"-5"}', "invalid_timestamp", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1e30}', "invalid_timestamp", None),
        ('{"user_id":1,"item_id":2,"behavior_type":"pv","ts":946684799}', "timestamp_out_of_range", None),
]


@pytest.fixture(scope="module")
def jsonl_rows(spark) -> dict[str, dict]:
    return {r["raw"]: r for r in parse(spark, "jsonl", [line for line, _, _ in JSONL_CASES])}


@pytest.mark.parametrize(("line", "reason", "epoch"), JSONL_CASES)
def test_jsonl_reasons_and_timestamps(jsonl_rows, line: str, reason: str | None, epoch: int | None) -> None:
    row = jsonl_rows[line]
    assert row["reason"] == reason, row["detail"]
    if epoch is not None:
        assert row["event_ts"] == epoch


def test_jsonl_repeated_key_is_named(jsonl_rows) -> None:
    row = jsonl_rows['{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200,"user_id":3}']
    assert row["detail"] == "duplicate key user_id"


def test_jsonl_text_after_the_object_is_named(jsonl_rows) -> None:
    row = jsonl_rows['{"user_id":1,"item_id":2,"behavior_type":"pv","ts":1511539200} x']
    assert row["detail"] == "text after the JSON object"


def test_jsonl_keeps_event_id_category_and_extras(spark) -> None:
    (row,) = parse(
        spark,
        "jsonl",
        ['{"event_id":"e-1","user_id":1,"item_id":2,"category_id":9,"behavior_type":"cart",'
         '"ts":1511539200,"device":"ios","ctx":{"page":3}}'],
    )
    assert row["reason"] is None
    assert row["event_id"] == "e-1"
    assert row["category_id"] == 9
    assert row["extras"] == {"device": "ios", "ctx": '{"page":3}'}


def test_sequences_one_event_per_item_with_increasing_times(spark) -> None:
    rows = parse(spark, "sequences", ["7 10 11 10", "8", "x 1", "9 1 y", "\t6\t3 "])
    good = sorted((r for r in rows if r["reason"] is None), key=lambda r: (r["user_id"], r["event_ts"]))
    assert [(r["user_id"], r["item_id"]) for r in good] == [(6, 3), (7, 10), (7, 11), (7, 10), (9, 1)]
    user7 = [r["event_ts"] for r in good if r["user_id"] == 7]
    assert user7 == sorted(user7) and len(set(user7)) == 3
    assert user7[0] == RULES.sequence_base_time.timestamp()
    assert user7[1] - user7[0] == timedelta(hours=1).total_seconds()
    assert all(r["behavior_type"] == "buy" for r in good)
    bad = sorted((r["raw"], r["reason"]) for r in rows if r["reason"])
    assert bad == [("8", "missing_field"), ("9 1 y", "invalid_id"), ("x 1", "invalid_id")]


def test_unknown_format_is_rejected(spark) -> None:
    raw = spark.createDataFrame([("x", "f")], "raw string, source_file string")
    with pytest.raises(ValueError, match="unknown input format"):
        parse_lines(raw, "parquet", RULES)  # type: ignore[arg-type]
