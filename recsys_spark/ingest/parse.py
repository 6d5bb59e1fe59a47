"""Parse raw lines of each input format into typed events plus a quarantine reason.

Each parser is a pure ``DataFrame -> DataFrame`` over rows ``(raw, source_file)`` and returns
the columns of ``PARSED_COLUMNS``: typed event fields, and ``reason``/``detail``, null for a
good event. Checks run in a fixed order, so a row gets the first reason that applies. Everything
is Spark SQL (no Python UDFs) and safe under ANSI mode (``try_*`` functions only).

Every format first requires the line to be at most ``max_line_bytes`` long (``line_too_long``
otherwise, its first bytes kept) and UTF-8 (``invalid_encoding`` otherwise; see ``_finish``).

Formats:

* ``taobao`` — ``user_id,item_id,category_id,behavior_type,timestamp``, no header, Unix seconds.
  Spaces around a field are ignored; any other character, a tab included, makes it invalid
  (trimming tabs as well made the parse 12-16% slower at 10M events).
* ``jsonl`` — one JSON object per line. Required: ``user_id``, ``item_id`` (non-negative integers,
  as numbers or strings), ``behavior_type`` (pv|cart|fav|buy, any case), ``ts`` (epoch seconds or
  milliseconds — a number at or above 1e11 is read as milliseconds — or an ISO-8601 string that
  starts with the date, with an optional offset). Optional: ``event_id`` (string, the deduplication key when present),
  ``category_id``. Any other keys are kept, as strings, in the ``extras`` map. Values are
  trimmed of spaces, as taobao fields are. An object that repeats a key, or is followed by
  anything but spaces, is malformed.
* ``sequences`` — ``user_id item item ...`` per line in time order (the SASRec/ICLRec benchmark
  format). Each item is one ``buy`` event; times are synthesised as ``base + position * step``.
  The unit counted is an item occurrence; a line without items counts as one row.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import reduce

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark.constants import (
    BEHAVIOR,
    BEHAVIORS,
    CATEGORY_ID,
    DETAIL,
    EVENT_ID,
    EVENT_TS,
    EXTRAS,
    INVALID_ENCODING,
    INVALID_ID,
    INVALID_TIMESTAMP,
    ITEM_ID,
    LINE_BYTES,
    LINE_TOO_LONG,
    MALFORMED_JSON,
    MISSING_FIELD,
    RAW,
    REASON,
    SOURCE_FILE,
    TIMESTAMP_OUT_OF_RANGE,
    UNKNOWN_BEHAVIOR,
    USER_ID,
    WRONG_FIELD_COUNT,
    InputFormat,
)
from recsys_spark.ingest.long_lines import PREVIEW_BYTES

# Patterns end in \z, not $: Java's $ also matches before a trailing line terminator ("5\n").
# A non-negative integer that fits in a signed 64-bit id: up to 18 digits always do; 19 digits
# do up to the largest long (equal-length digit strings compare like their numbers).
_ID_PATTERN = r"^[0-9]{1,18}\z"
_ID_19_DIGITS_PATTERN = r"^[0-9]{19}\z"
_MAX_ID = str(2**63 - 1)
# Epoch numbers as Spark's JSON reader renders them (large or fractional ones in E notation).
_EPOCH_PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?\z"
# ISO-8601 strings must start with a full date: Spark reads a bare time ("16:00") as today's.
_ISO_DATE_PATTERN = r"^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
# A closing brace followed by more than spaces or braces: worth a strict second look (below).
# Anything after a closing brace: the lines worth checking for text after the object.
_AFTER_BRACE_PATTERN = r"\}\s*\S"
_EPOCH_LIMIT = 1e15  # as milliseconds, year 33658; keeps microseconds inside 64 bits
_MILLIS_THRESHOLD = 1e11  # 1e11 seconds is year 5138; as milliseconds it is 1973
_TAOBAO_FIELDS = 5
_JSON_KNOWN_KEYS = (EVENT_ID, USER_ID, ITEM_ID, CATEGORY_ID, BEHAVIOR, "ts")

PARSED_COLUMNS: tuple[str, ...] = (
    RAW,
    SOURCE_FILE,
    EVENT_ID,
    USER_ID,
    ITEM_ID,
    CATEGORY_ID,
    BEHAVIOR,
    EVENT_TS,
    EXTRAS,
    REASON,
    DETAIL,
)


@dataclass(frozen=True)
class ValidationRules:
    """Event times outside ``[min_time, max_time]`` and lines over ``max_line_bytes`` are
    quarantined."""

    min_time: datetime
    max_time: datetime
    sequence_base_time: datetime
    sequence_step_seconds: int
    max_line_bytes: int


@dataclass(frozen=True)
class _Check:
    failed: Column
    reason: str
    detail: Column


def _finish(df: DataFrame, format_checks: Sequence[_Check], rules: ValidationRules) -> DataFrame:
    """Add ``reason`` and ``detail`` of the first failing check (null for a good row).

    The checks are evaluated once, into the index of the first failure; the reason is looked up
    by index and the detail (string building) is computed for failed rows only.

    Every format first checks the length, then the encoding. A too-long line keeps only its
    first bytes (all that was read of it, see ``long_lines``). Spark reads lines as bytes
    without decoding them, and Parquet readers (Arrow, delta-rs) refuse strings that are not
    UTF-8, so such a line is quarantined with its exact bytes in hex, and its ``raw`` is stored
    with U+FFFD replacements.
    """
    head = storable_text(F.substring(F.col(RAW).cast("binary"), 1, PREVIEW_BYTES).cast("string"))
    too_long = _Check(
        F.col(LINE_BYTES) > rules.max_line_bytes,
        LINE_TOO_LONG,
        F.concat(F.lit("line of "), F.col(LINE_BYTES).cast("string"),
                 F.lit(f" bytes, over ingest.max_line_bytes={rules.max_line_bytes}; first bytes: "), head),
    )
    encoding = _Check(
        ~F.is_valid_utf8(F.col(RAW)),
        INVALID_ENCODING,
        F.concat(F.lit("not UTF-8; bytes (hex): "), F.hex(F.col(RAW).cast("binary"))),
    )
    checks = [too_long, encoding, *format_checks]
    first = F.when(checks[0].failed, F.lit(0))
    for i, check in enumerate(checks[1:], start=1):
        first = first.when(check.failed, F.lit(i))
    reasons = F.array(*[F.lit(c.reason) for c in checks])
    detail = F.when(F.col("_failed") == 0, checks[0].detail)
    for i, check in enumerate(checks[1:], start=1):
        detail = detail.when(F.col("_failed") == i, check.detail)
    return (
        df.withColumn("_failed", first)
        .withColumn(REASON, F.try_element_at(reasons, F.col("_failed") + 1))
        .withColumn(DETAIL, detail)
        .withColumn(RAW, F.when(F.col("_failed") == 0, head)
                    .when(F.col("_failed") == 1, storable_text(F.col(RAW)))
                    .otherwise(F.col(RAW)))
        .select(*PARSED_COLUMNS)
    )


def storable_text(raw: Column) -> Column:
    """``raw`` as valid UTF-8 (invalid bytes become U+FFFD), which every table reader accepts."""
    return F.make_valid_utf8(raw)


def _is_id(value: Column) -> Column:
    fits = value.rlike(_ID_PATTERN) | (value.rlike(_ID_19_DIGITS_PATTERN) & (value <= F.lit(_MAX_ID)))
    return F.coalesce(fits, F.lit(False))


def _blank(value: Column) -> Column:
    return value.isNull() | (value == "")


def _out_of_range(ts: Column, rules: ValidationRules) -> Column:
    return (ts < F.lit(rules.min_time)) | (ts > F.lit(rules.max_time))


def _describe(name: str, value: Column) -> Column:
    return F.concat(F.lit(f"{name}="), F.coalesce(value, F.lit("<null>")))


def parse_taobao(raw: DataFrame, rules: ValidationRules) -> DataFrame:
    """Parse Taobao UserBehavior CSV lines (see module docstring)."""
    fields = F.split(F.col(RAW), ",", -1)

    def field(i: int) -> Column:
        return F.trim(F.try_element_at(fields, F.lit(i + 1)))

    user, item, category, behavior, ts_text = (field(i) for i in range(_TAOBAO_FIELDS))
    df = raw.select(
        RAW,
        SOURCE_FILE,
        LINE_BYTES,
        F.lit(None).cast("string").alias(EVENT_ID),
        user.alias("_user"),
        item.alias("_item"),
        category.alias("_category"),
        F.lower(behavior).alias(BEHAVIOR),
        ts_text.alias("_ts"),
        F.size(fields).alias("_n"),
    )
    # Unix seconds only; 12 digits reach year 33658, so milliseconds are rejected, not misread.
    ts = F.when(
        F.col("_ts").rlike(r"^[0-9]{1,12}\z"), F.timestamp_seconds(F.col("_ts").try_cast("bigint"))
    )
    df = df.select(
        "*",
        F.col("_user").try_cast("bigint").alias(USER_ID),
        F.col("_item").try_cast("bigint").alias(ITEM_ID),
        F.col("_category").try_cast("bigint").alias(CATEGORY_ID),
        ts.alias(EVENT_TS),
        F.lit(None).cast("map<string,string>").alias(EXTRAS),
    )
    blank = [
        ("user_id", "_user"),
        ("item_id", "_item"),
        ("category_id", "_category"),
        ("behavior_type", BEHAVIOR),
        ("timestamp", "_ts"),
    ]
    checks = [
        _Check(
            F.col("_n") != _TAOBAO_FIELDS,
            WRONG_FIELD_COUNT,
            F.concat(F.lit(f"expected {_TAOBAO_FIELDS} fields, got "), F.col("_n").cast("string")),
        ),
        _missing_check(blank),
        *_id_checks(
            [
                ("user_id", F.col("_user")),
                ("item_id", F.col("_item")),
                ("category_id", F.col("_category")),
            ]
        ),
        _behavior_check(),
        _Check(F.col(EVENT_TS).isNull(), INVALID_TIMESTAMP, _describe("timestamp", F.col("_ts"))),
        _range_check(rules),
    ]
    return _finish(df, checks, rules)


def parse_jsonl(raw: DataFrame, rules: ValidationRules) -> DataFrame:
    """Parse JSON-lines click events (see module docstring for the schema)."""
    obj = F.from_json(F.col(RAW), "map<string,string>")

    def key(name: str) -> Column:
        return F.trim(F.try_element_at(F.col("_obj"), F.lit(name)))

    df = raw.select(RAW, SOURCE_FILE, LINE_BYTES, obj.alias("_obj"))
    df = df.select(
        "*",
        key(EVENT_ID).alias("_event_id"),
        key(USER_ID).alias("_user"),
        key(ITEM_ID).alias("_item"),
        key(CATEGORY_ID).alias("_category"),
        F.lower(key(BEHAVIOR)).alias(BEHAVIOR),
        key("ts").alias("_ts"),
    )
    epoch = F.col("_ts").try_cast("double")
    micros = F.when(epoch >= _MILLIS_THRESHOLD, epoch * 1_000).otherwise(epoch * 1_000_000)
    ts = (
        F.when(F.col("_ts").rlike(_ISO_DATE_PATTERN), F.try_to_timestamp(F.col("_ts")))
        .when(
            F.col("_ts").rlike(_EPOCH_PATTERN) & (epoch < _EPOCH_LIMIT),
            F.timestamp_micros(F.round(micros).try_cast("bigint")),
        )
    )
    df = df.select(
        "*",
        F.when(~_blank(F.col("_event_id")), F.col("_event_id")).alias(EVENT_ID),
        F.col("_user").try_cast("bigint").alias(USER_ID),
        F.col("_item").try_cast("bigint").alias(ITEM_ID),
        F.col("_category").try_cast("bigint").alias(CATEGORY_ID),
        ts.alias(EVENT_TS),
        F.map_filter("_obj", lambda k, _: ~k.isin(*_JSON_KNOWN_KEYS)).alias(EXTRAS),
    )
    required = [
        ("user_id", "_user"),
        ("item_id", "_item"),
        ("behavior_type", BEHAVIOR),
        ("ts", "_ts"),
    ]
    keys = F.map_keys("_obj")
    # Spark's JSON map keeps every occurrence of a repeated key and lookups see the first one:
    # such an object is ambiguous, and silver maps must not hold a key twice.
    repeated_key = F.try_element_at(
        F.filter(keys, lambda k, i: F.array_position(keys, k) != i + 1), F.lit(1)
    )
    # Spark's JSON reader stops after the first value, so "{...}{...}" (a lost newline) would
    # drop the second event silently, and "{...}}" would pass. Followed by ",0" inside an
    # array, a line that is exactly one JSON value makes an array of two; anything after the
    # value makes it longer, cut short (a stray "]") or invalid.
    text_after_object = F.col(RAW).rlike(_AFTER_BRACE_PATTERN) & F.coalesce(
        F.json_array_length(F.concat(F.lit("["), F.col(RAW), F.lit(",0]"))) != 2, F.lit(True)
    )
    checks = [
        _Check(F.col("_obj").isNull(), MALFORMED_JSON, F.lit("not a JSON object")),
        _Check(text_after_object, MALFORMED_JSON, F.lit("text after the JSON object")),
        _Check(
            F.size(keys) != F.size(F.array_distinct(keys)),
            MALFORMED_JSON,
            F.concat(F.lit("duplicate key "), repeated_key),
        ),
        _missing_check(required),
        *_id_checks(
            [("user_id", F.col("_user")), ("item_id", F.col("_item"))],
            optional=[("category_id", F.col("_category"))],
        ),
        _behavior_check(),
        _Check(F.col(EVENT_TS).isNull(), INVALID_TIMESTAMP, _describe("ts", F.col("_ts"))),
        _range_check(rules),
    ]
    return _finish(df, checks, rules)


def parse_sequences(raw: DataFrame, rules: ValidationRules) -> DataFrame:
    """Parse ``user item item ...`` lines into one ``buy`` event per item occurrence.

    Item ``p`` of a user's items is timed ``base + p * step``, counting across the user's lines
    in file and line order (a user on two lines continues, never restarts: their items must not
    interleave, nor share a time and pass for duplicates)."""
    # Any whitespace separates tokens, so padding of any kind (a leading tab) is not a token.
    # A too-long line is one row, whatever its first bytes hold.
    tokens = F.when(F.col(LINE_BYTES) <= rules.max_line_bytes, F.array_remove(F.split(F.col(RAW), r"\s+"), ""))
    items = F.slice(tokens, 2, F.greatest(F.size(tokens) - 1, F.lit(0)))
    lines = raw.select(
        RAW,
        SOURCE_FILE,
        LINE_BYTES,
        # read order within a file, taken before any shuffle (Spark keeps a file's splits in order)
        F.monotonically_increasing_id().alias("_line"),
        F.try_element_at(tokens, F.lit(1)).alias("_user"),
        items.alias("_items"),
    )
    earlier = Window.partitionBy(F.col("_user").try_cast("bigint")).orderBy(SOURCE_FILE, "_line").rowsBetween(
        Window.unboundedPreceding, -1)
    lines = lines.withColumn("_before", F.coalesce(F.sum(F.greatest(F.size("_items"), F.lit(0))).over(earlier),
                                                   F.lit(0)))
    df = lines.select(RAW, SOURCE_FILE, LINE_BYTES, "_user", "_before",
                      F.posexplode_outer("_items").alias("_pos", "_item"))
    base = F.lit(rules.sequence_base_time).cast("timestamp")
    step = F.make_dt_interval(secs=(F.col("_before") + F.col("_pos")) * rules.sequence_step_seconds)
    df = df.select(
        "*",
        F.lit(None).cast("string").alias(EVENT_ID),
        F.col("_user").try_cast("bigint").alias(USER_ID),
        F.col("_item").try_cast("bigint").alias(ITEM_ID),
        F.lit(None).cast("bigint").alias(CATEGORY_ID),
        F.lit("buy").alias(BEHAVIOR),
        (base + step).alias(EVENT_TS),
        F.lit(None).cast("map<string,string>").alias(EXTRAS),
    )
    checks = [
        _Check(
            _blank(F.col("_user")) | F.col("_item").isNull(),
            MISSING_FIELD,
            F.lit("line has no items"),
        ),
        *_id_checks([("user_id", F.col("_user")), ("item_id", F.col("_item"))]),
        _range_check(rules),
    ]
    return _finish(df, checks, rules)


def _missing_check(fields: Sequence[tuple[str, str]]) -> _Check:
    """Missing-field check over (name, column) pairs; the detail names the first empty one."""
    empty = [(name, _blank(F.col(column))) for name, column in fields]
    which = F.when(empty[0][1], F.lit(empty[0][0]))
    for name, condition in empty[1:]:
        which = which.when(condition, F.lit(name))
    return _Check(
        reduce(operator.or_, (condition for _, condition in empty)),
        MISSING_FIELD,
        F.concat(F.lit("empty "), which),
    )


def _id_checks(
    required: Sequence[tuple[str, Column]], optional: Sequence[tuple[str, Column]] = ()
) -> list[_Check]:
    checks = [_Check(~_is_id(value), INVALID_ID, _describe(name, value)) for name, value in required]
    checks += [
        _Check(~_blank(value) & ~_is_id(value), INVALID_ID, _describe(name, value))
        for name, value in optional
    ]
    return checks


def _behavior_check() -> _Check:
    return _Check(
        ~F.coalesce(F.col(BEHAVIOR).isin(*BEHAVIORS), F.lit(False)),
        UNKNOWN_BEHAVIOR,
        _describe("behavior_type", F.col(BEHAVIOR)),
    )


def _range_check(rules: ValidationRules) -> _Check:
    return _Check(
        _out_of_range(F.col(EVENT_TS), rules),
        TIMESTAMP_OUT_OF_RANGE,
        F.concat(F.lit("event time "), F.col(EVENT_TS).cast("string")),
    )


PARSERS: dict[str, Callable[[DataFrame, ValidationRules], DataFrame]] = {
    "taobao": parse_taobao,
    "jsonl": parse_jsonl,
    "sequences": parse_sequences,
}


def parse_lines(raw: DataFrame, fmt: InputFormat, rules: ValidationRules) -> DataFrame:
    """Dispatch on ``fmt``; ``raw`` has columns ``raw`` and ``source_file``, and ``line_bytes``
    where a line may have been read only in part (default: the length of ``raw``)."""
    try:
        parser = PARSERS[fmt]
    except KeyError:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {sorted(PARSERS)}") from None
    if LINE_BYTES not in raw.columns:
        raw = raw.withColumn(LINE_BYTES, F.octet_length(RAW).cast("long"))
    return parser(raw, rules)
