"""Bronze -> silver ingest of a behaviour log: ``recsys ingest`` and ``jobs/ingest.py``.

Every input row ends in exactly one place — silver ``events``, ``quarantine/events`` (with a
reason code), or the duplicate count — and ``rows_in == rows_clean + rows_quarantined +
rows_duplicate`` holds for every run. Raw lines are kept as read in ``bronze/events_raw``.

Idempotency: a run's id is derived from the content of the files it ingests. Every table write
carries that id as a Delta application transaction, so a rerun after a crash skips the writes
that were already committed and completes the rest; files whose content a successful run
already ingested are not read again and count as duplicates.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark.config import Settings
from recsys_spark.constants import (
    BRONZE_EVENTS_RAW,
    DETAIL,
    EVENT_DATE,
    EVENT_ID,
    EVENT_KEY,
    EVENT_TS,
    FORMAT_KEY,
    INGEST_DATE,
    INVALID_ENCODING,
    ITEM_ID,
    ITEM_IDX,
    LINE_BYTES,
    OPS_INGEST_RUNS,
    QUARANTINE_EVENTS,
    RAW,
    REASON,
    RUN_ID,
    SILVER_EVENTS,
    SILVER_ITEM_INDEX,
    SILVER_USER_INDEX,
    SOURCE_FILE,
    USER_ID,
    USER_IDX,
    InputFormat,
)
from recsys_spark.errors import InputDataError
from recsys_spark.ingest.appends import Append, IngestedFile, copy_tail, find_append
from recsys_spark.ingest.long_lines import LineMarker, LineSource, guard_long_lines, marked_lines
from recsys_spark.ingest.parse import ValidationRules, parse_lines
from recsys_spark.ingest.sources import InputFile, discover_inputs, is_uri
from recsys_spark.ingest.transforms import (
    TIEBREAK,
    bronze_rows,
    continue_sequences,
    drop_known,
    event_key,
    first_occurrences,
    new_index_entries,
    quarantine_rows,
    repeated_key_hashes,
    silver_rows,
    with_indices,
)
from recsys_spark.logs import get_logger, log_event, timed
from recsys_spark.spark import hadoop_conf, jvm, literal_path, one_row
from recsys_spark.storage import Idempotency, Lakehouse

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = get_logger("ingest")

INGEST_RUNS_SCHEMA = T.StructType(
    [
        T.StructField("run_id", T.StringType()),
        T.StructField("attempt_started_at", T.TimestampType()),
        T.StructField("finished_at", T.TimestampType()),
        T.StructField("status", T.StringType()),
        T.StructField("format", T.StringType()),
        T.StructField("input", T.StringType()),
        T.StructField(
            "files",
            T.ArrayType(
                T.StructType(
                    [
                        T.StructField("path", T.StringType()),
                        T.StructField("fingerprint", T.StringType()),
                        T.StructField("rows_in", T.LongType()),
                        T.StructField("skipped", T.BooleanType()),
                        T.StructField("size", T.LongType()),
                        # bytes an earlier ingest of the same path had read (an appended log)
                        T.StructField("offset", T.LongType()),
                        # rows of the whole file: this run's and the earlier ingests' it extends
                        T.StructField("rows_total", T.LongType()),
                    ]
                )
            ),
        ),
        T.StructField("rows_in", T.LongType()),
        T.StructField("rows_clean", T.LongType()),
        T.StructField("rows_quarantined", T.LongType()),
        T.StructField("rows_duplicate", T.LongType()),
        T.StructField("lines_in", T.LongType()),
        T.StructField("quarantine_reasons", T.MapType(T.StringType(), T.LongType())),
        T.StructField("new_users", T.LongType()),
        T.StructField("new_items", T.LongType()),
        T.StructField("table_versions", T.MapType(T.StringType(), T.LongType())),
        T.StructField("engine", T.StringType()),
    ]
)


@dataclass
class IngestReport:
    """What one ``recsys ingest`` did; ``--json`` prints it."""

    run_id: str
    format: str
    input: str
    status: str
    rows_in: int
    rows_clean: int
    rows_quarantined: int
    rows_duplicate: int
    lines_in: int
    quarantine_reasons: dict[str, int]
    files: list[dict[str, Any]]
    new_users: int = 0
    new_items: int = 0
    table_versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _ParseSummary:
    """Counts of one parse, per file and per reason (``None`` = valid)."""

    per_file_reason: dict[tuple[str, str | None], int]
    first_valid_date: date | None
    last_valid_date: date | None
    valid_with_event_id: int = 0

    @property
    def valid(self) -> int:
        return sum(n for (_, reason), n in self.per_file_reason.items() if reason is None)

    @property
    def reasons(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for (_, reason), n in self.per_file_reason.items():
            if reason is not None:
                counts[reason] += n
        return dict(sorted(counts.items()))

    def rows_of(self, path: str) -> int:
        return sum(n for (p, _), n in self.per_file_reason.items() if p == path)


def validation_rules(settings: Settings, now: datetime) -> ValidationRules:
    return ValidationRules(
        min_time=settings.ingest.min_event_time,
        max_time=now + timedelta(seconds=settings.ingest.max_future_seconds),
        sequence_base_time=settings.ingest.sequence_base_time,
        sequence_step_seconds=settings.ingest.sequence_step_seconds,
        max_line_bytes=settings.ingest.max_line_bytes,
    )


def run_ingest(
    spark: SparkSession,
    lake: Lakehouse,
    settings: Settings,
    *,
    input_path: str,
    fmt: InputFormat,
    now: datetime | None = None,
) -> IngestReport:
    """Ingest ``input_path`` (a file or a folder of files) of format ``fmt`` into the lakehouse.

    Raises:
        InputDataError: missing or empty input, or nothing in it parses as ``fmt``; nothing is
            written then.
    """
    started = now or datetime.now(UTC)
    files = discover_inputs(input_path, spark, lakehouse=lake.root)
    with lake.lock("ingest"):
        ingested = _ingested_files(lake)
        rows_of = {f.fingerprint: f.rows_total for f in ingested}
        new_files = [f for f in files if f.fingerprint not in rows_of]
        appends = {f.path: found for f in new_files if (found := find_append(f, ingested)) is not None}
        run_id = _run_id(fmt, new_files or files)
        log_event(log, "ingest.start", run_id=run_id, format=fmt, files=len(files),
                  already_ingested=len(files) - len(new_files), appended=len(appends))
        skipped_rows = sum(rows_of.get(f.fingerprint, 0) for f in files if f not in new_files)
        if new_files:
            report = _ingest_files(spark, lake, settings, _Inputs(new_files, appends), run_id, fmt, started)
        else:
            report = _empty_report(run_id, fmt)
        report.input = str(input_path)
        report.rows_in += skipped_rows
        report.rows_duplicate += skipped_rows
        report.files += [
            {"path": f.path, "fingerprint": f.fingerprint, "rows_in": rows_of[f.fingerprint],
             "skipped": True, "size": f.size, "offset": 0, "rows_total": rows_of[f.fingerprint]}
            for f in files
            if f not in new_files
        ]
        report.status = "succeeded" if new_files else "skipped"
        report.seconds = round((datetime.now(UTC) - started).total_seconds(), 2)
        _record_run(spark, lake, report, started)
    log_event(log, "ingest.done", **{k: v for k, v in report.as_dict().items() if k != "files"})
    return report


@dataclass(frozen=True)
class _Inputs:
    """The files a run reads, and those of them that extend a file ingested before."""

    files: list[InputFile]
    appends: dict[str, Append]

    def sources(self, folder: Path | None) -> list[LineSource]:
        """What Spark reads for each file: the file, or a copy of its appended bytes."""
        sources = []
        for number, file in enumerate(self.files):
            append = self.appends.get(file.path)
            read = file.path
            if append is not None and folder is not None:
                read = copy_tail(file.path, append.offset, folder / f"{number}.tail")
            sources.append(LineSource(read=read, source=file.path))
        return sources


@dataclass(frozen=True)
class _Counts:
    """How the parsed rows of a run divide up: the parse summary, and the bad lines that were
    quarantined before (same file, same text: an edited log read again) per reason."""

    summary: _ParseSummary
    seen_bad: dict[str, int]

    @property
    def quarantined(self) -> dict[str, int]:
        left = {r: n - self.seen_bad.get(r, 0) for r, n in self.summary.reasons.items()}
        return {r: n for r, n in left.items() if n}


def _ingest_files(
    spark: SparkSession,
    lake: Lakehouse,
    settings: Settings,
    inputs: _Inputs,
    run_id: str,
    fmt: InputFormat,
    started: datetime,
) -> IngestReport:
    once = Idempotency(app_id=run_id, version=1)
    with lake.scratch(f"ingest/{run_id}") as scratch:
        local = None if is_uri(scratch.path) else Path(scratch.path)
        raw = _read_inputs(spark, inputs, local, settings.ingest.max_line_bytes)
        # Parse once into scratch: every later pass (counts, quarantine, duplicates,
        # dictionaries, silver) reads typed columns instead of re-parsing the text.
        with timed(log, "ingest.parse", run_id=run_id):
            parsed = staged_parse(raw, fmt, validation_rules(settings, started))
            if fmt == "sequences":
                parsed = continue_sequences(parsed, _last_event_times(lake, run_id), settings.ingest)
            parsed = scratch.put(parsed, "parsed")
        summary = _summarize(parsed)
        log_event(log, "ingest.validated", run_id=run_id, valid=summary.valid, quarantined=summary.reasons)
        _require_valid_rows(summary, inputs.files, fmt)
        seen_bad = scratch.put(_already_quarantined(lake, parsed, run_id), "seen_bad")
        counts = _Counts(summary, {r[REASON]: int(r["n"]) for r in seen_bad.groupBy(REASON).count()
                                   .withColumnRenamed("count", "n").collect()})
        versions: dict[str, int] = {}
        with timed(log, "ingest.bronze", run_id=run_id):
            bronze = lake.write(bronze_rows(raw, run_id, started), BRONZE_EVENTS_RAW,
                                partition_by=[INGEST_DATE], idempotency=once)
            versions[BRONZE_EVENTS_RAW] = bronze.version
        with timed(log, "ingest.quarantine", run_id=run_id):
            bad = quarantine_rows(parsed.join(seen_bad, [SOURCE_FILE, RAW, REASON], "left_anti"), run_id, started)
            versions[QUARANTINE_EVENTS] = lake.write(bad, QUARANTINE_EVENTS, partition_by=[INGEST_DATE],
                                                     idempotency=once).version
        valid = parsed.filter(F.col(REASON).isNull()).drop(RAW, REASON, DETAIL)
        # Dictionaries from every valid row: a duplicate or an already-ingested event carries
        # ids that its first occurrence brings anyway, so the result equals that of the clean
        # rows without staging them.
        with timed(log, "ingest.dictionaries", run_id=run_id) as out:
            user_index, new_users = _extend_index(lake, valid, SILVER_USER_INDEX, USER_ID, USER_IDX, once)
            item_index, new_items = _extend_index(lake, valid, SILVER_ITEM_INDEX, ITEM_ID, ITEM_IDX, once)
            out.update(new_users=new_users, new_items=new_items)
        versions[SILVER_USER_INDEX] = lake.version(SILVER_USER_INDEX)
        versions[SILVER_ITEM_INDEX] = lake.version(SILVER_ITEM_INDEX)
        with timed(log, "ingest.deduplicate", run_id=run_id):
            repeated = scratch.put(repeated_key_hashes(valid), "repeated")  # small: duplicates are rare
        with timed(log, "ingest.silver", run_id=run_id):
            clean = drop_known(first_occurrences(valid, repeated), _known_events(lake, summary, run_id))
            versions[SILVER_EVENTS], rows_clean = _write_silver(
                lake, silver_rows(with_indices(clean, user_index, item_index), run_id), fmt, once)
        lines_in = bronze.rows_written if bronze.rows_written is not None else raw.count()
    return _report(run_id, fmt, inputs, counts, rows_clean, lines_in, new_users, new_items, versions)


def _read_inputs(spark: SparkSession, inputs: _Inputs, scratch: Path | None, max_line_bytes: int) -> DataFrame:
    """The lines of the inputs (the appended part of an appended log), too-long ones stood in
    for (``long_lines``)."""
    marker = LineMarker.new()
    sources = inputs.sources(None if scratch is None else scratch / "appended")
    sources = guard_long_lines(sources, None if scratch is None else scratch / "long-lines",
                               max_line_bytes=max_line_bytes, marker=marker)
    return read_lines(spark, sources, marker=marker)


def _require_valid_rows(summary: _ParseSummary, files: list[InputFile], fmt: InputFormat) -> None:
    if summary.valid:
        return
    reasons = ", ".join(f"{r}={n}" for r, n in summary.reasons.items()) or "no rows"
    hint = (
        "is it text? Compressed files are read by extension: .gz, .bz2, .zst"
        if set(summary.reasons) == {INVALID_ENCODING}
        else "check --format"
    )
    raise InputDataError(f"nothing in {', '.join(f.path for f in files)} parses as {fmt} ({reasons}); {hint}")


def _already_quarantined(lake: Lakehouse, parsed: DataFrame, run_id: str) -> DataFrame:
    """Bad lines of ``parsed`` that an earlier run quarantined from the same file with the same
    text and reason: not new, so duplicates, as a good row already in silver is."""
    bad = parsed.filter(F.col(REASON).isNotNull()).select(SOURCE_FILE, RAW, REASON)
    if not lake.exists(QUARANTINE_EVENTS):
        return bad.limit(0)
    earlier = lake.read(QUARANTINE_EVENTS).filter(F.col(RUN_ID) != run_id).select(SOURCE_FILE, RAW, REASON)
    return bad.join(earlier.distinct(), [SOURCE_FILE, RAW, REASON], "left_semi")


def _write_silver(lake: Lakehouse, silver: DataFrame, fmt: InputFormat, once: Idempotency) -> tuple[int, int]:
    """Append the run's clean events; returns the version and the rows the run added."""
    if lake.exists(SILVER_EVENTS) and EVENT_KEY in lake.read(SILVER_EVENTS).columns:
        # silver tables created before the key string was dropped keep getting it
        silver = silver.withColumn(EVENT_KEY, event_key())
    result = lake.write(
        silver,
        SILVER_EVENTS,
        partition_by=[EVENT_DATE],
        idempotency=once,
        commit_info={FORMAT_KEY: fmt, "ingest_run_id": once.app_id},  # see features.ingested_formats
    )
    rows = result.rows_written
    if rows is None:  # committed by an earlier attempt of this run
        rows = lake.read(SILVER_EVENTS).filter(F.col(RUN_ID) == once.app_id).count()
    return result.version, rows


def _report(
    run_id: str, fmt: InputFormat, inputs: _Inputs, counts: _Counts, rows_clean: int, lines_in: int,
    new_users: int, new_items: int, versions: dict[str, int],
) -> IngestReport:
    summary = counts.summary
    seen_bad = sum(counts.seen_bad.values())
    files = []
    for f in inputs.files:
        append = inputs.appends.get(f.path)
        rows = summary.rows_of(f.path)
        files.append({"path": f.path, "fingerprint": f.fingerprint, "rows_in": rows, "skipped": False,
                      "size": f.size, "offset": 0 if append is None else append.offset,
                      "rows_total": rows + (0 if append is None else append.rows_before)})
    return IngestReport(
        run_id=run_id,
        format=fmt,
        input="",
        status="succeeded",
        rows_in=summary.valid + sum(summary.reasons.values()),
        rows_clean=rows_clean,
        rows_quarantined=sum(counts.quarantined.values()),
        rows_duplicate=summary.valid - rows_clean + seen_bad,
        lines_in=lines_in,
        quarantine_reasons=counts.quarantined,
        files=files,
        new_users=new_users,
        new_items=new_items,
        table_versions=versions,
    )


def _last_event_times(lake: Lakehouse, run_id: str) -> DataFrame | None:
    """Each user's newest event time in silver (not counting this run's own rows)."""
    if not lake.exists(SILVER_EVENTS):
        return None
    return (lake.read(SILVER_EVENTS).filter(F.col(RUN_ID) != run_id)
            .groupBy(USER_ID).agg(F.max(EVENT_TS).alias(EVENT_TS)))


def staged_parse(raw: DataFrame, fmt: InputFormat, rules: ValidationRules) -> DataFrame:
    """Parsed rows as staged for the later passes: typed fields, reason and a tie-break hash of
    the raw line; the raw text itself only where it will be quarantined."""
    parsed = parse_lines(raw, fmt, rules)
    return parsed.select(
        *[c for c in parsed.columns if c != RAW],
        F.when(F.col(REASON).isNotNull(), F.col(RAW)).alias(RAW),
        F.xxhash64(RAW).alias(TIEBREAK),
    )


def _known_events(lake: Lakehouse, summary: _ParseSummary, run_id: str) -> DataFrame | None:
    """Silver events that may repeat this input's events."""
    if not lake.exists(SILVER_EVENTS):
        return None
    # A natural key holds its time, so only the dates this input covers can hold its
    # duplicates (partition pruning). An event_id is a key on any date: a re-sent event with a
    # corrected time is still the same event, so events with ids are looked up in every date.
    # Rows this same run committed before a crash are not "already known": they are ours.
    in_dates = F.col(EVENT_DATE).between(F.lit(summary.first_valid_date), F.lit(summary.last_valid_date))
    if summary.valid_with_event_id:
        in_dates = in_dates | F.col(EVENT_ID).isNotNull()
    return lake.read(SILVER_EVENTS).filter(in_dates).filter(F.col(RUN_ID) != run_id)


# More input files than this are read in one go (see read_lines).
_FILES_READ_ONE_BY_ONE = 16


def read_lines(spark: SparkSession, sources: list[LineSource], *, marker: LineMarker | None = None) -> DataFrame:
    """Raw lines with the path of the file they came from, and each line's length in bytes
    (``marker``: the stand-in of a too-long line, see ``long_lines``).

    A few files: one read each with the path as a literal, much cheaper than Spark's per-row
    ``_metadata.file_path`` string. Many files (an hourly drop): one read of all of them, since
    every read costs the driver a plan of its own (400 small files took 148 s one by one, 20 s
    together); Spark's spelling of each path is then mapped back to ours by a broadcast join.
    """
    if len(sources) <= _FILES_READ_ONE_BY_ONE:
        reads = [
            spark.read.text(literal_path(s.read)).select("value", F.lit(s.source).alias(SOURCE_FILE))
            for s in sources
        ]
        lines = reduce(DataFrame.unionByName, reads)
    else:
        spelled = spark.createDataFrame(
            [(spelling, s.source) for s in sources for spelling in _spark_spellings(spark, s.read)],
            "spark_path string, source string",
        )
        read = spark.read.text([literal_path(s.read) for s in sources]).select(
            "value", F.col("_metadata.file_path").alias("spark_path")
        )
        source = F.coalesce(  # a path spelled otherwise fails the run, it never loses its origin
            F.col("source"), F.raise_error(F.concat(F.lit("unmapped input file "), F.col("spark_path")))
        )
        lines = read.join(F.broadcast(spelled), "spark_path", "left").select("value", source.alias(SOURCE_FILE))
    text, length = marked_lines(F.col("value"), marker)
    return lines.select(text.alias(RAW), SOURCE_FILE, length.alias(LINE_BYTES))


def _spark_spellings(spark: SparkSession, path: str) -> set[str]:
    """How ``_metadata.file_path`` may spell ``path``: its file system's status path,
    URL-encoded, with a local file's URI as ``file:///x`` or ``file:/x`` (listings differ)."""
    gateway = jvm(spark)
    hadoop_path = gateway.org.apache.hadoop.fs.Path(path)
    status = hadoop_path.getFileSystem(hadoop_conf(spark)).getFileStatus(hadoop_path)
    encoded = gateway.org.apache.spark.paths.SparkPath.fromPath(status.getPath()).urlEncoded()
    return {encoded, re.sub(r"^file:///", "file:/", encoded)}


def _summarize(parsed: DataFrame) -> _ParseSummary:
    rows = (
        parsed.groupBy(SOURCE_FILE, REASON)
        .agg(
            F.count("*").alias("n"),
            F.min(F.to_date(EVENT_TS)).alias("lo"),
            F.max(F.to_date(EVENT_TS)).alias("hi"),
            F.count(EVENT_ID).alias("with_id"),
        )
        .collect()
    )
    valid = [r for r in rows if r[REASON] is None]
    return _ParseSummary(
        {(r[SOURCE_FILE], r[REASON]): int(r["n"]) for r in rows},
        first_valid_date=min((r["lo"] for r in valid), default=None),
        last_valid_date=max((r["hi"] for r in valid), default=None),
        valid_with_event_id=sum(int(r["with_id"]) for r in valid),
    )


def _extend_index(
    lake: Lakehouse,
    clean: DataFrame,
    table: str,
    col_id: str,
    col_idx: str,
    once: Idempotency,
) -> tuple[DataFrame, int]:
    index = lake.read(table) if lake.exists(table) else None
    next_idx = 0
    if index is not None:
        top = one_row(index.agg(F.max(col_idx)))[0]
        next_idx = 0 if top is None else int(top) + 1
    entries = new_index_entries(clean, index, col_id=col_id, col_idx=col_idx, next_idx=next_idx)
    entries = entries.withColumn(RUN_ID, F.lit(once.app_id))
    result = lake.write(entries, table, idempotency=once)
    index = lake.read(table)
    added = result.rows_written
    if added is None:  # committed by an earlier attempt of this run: count what it added
        added = index.filter(F.col(RUN_ID) == once.app_id).count()
    return index, added


def _ingested_files(lake: Lakehouse) -> list[IngestedFile]:
    """Every file a successful run read (not those it skipped as ingested before)."""
    if not lake.exists(OPS_INGEST_RUNS):
        return []
    rows = (
        lake.read(OPS_INGEST_RUNS)
        .filter(F.col("status") == "succeeded")
        .select(F.explode("files").alias("f"))
        .filter(~F.col("f.skipped"))
        .select("f.path", "f.fingerprint", "f.size", "f.rows_total")
        .collect()
    )
    return [IngestedFile(r["path"], r["fingerprint"], int(r["size"]), int(r["rows_total"])) for r in rows]


def _run_id(fmt: str, files: list[InputFile]) -> str:
    digest = hashlib.sha256(fmt.encode())
    for fingerprint in sorted(f.fingerprint for f in files):
        digest.update(fingerprint.encode())
    return f"ingest-{digest.hexdigest()[:16]}"


def _empty_report(run_id: str, fmt: str) -> IngestReport:
    return IngestReport(
        run_id=run_id,
        format=fmt,
        input="",
        status="skipped",
        rows_in=0,
        rows_clean=0,
        rows_quarantined=0,
        rows_duplicate=0,
        lines_in=0,
        quarantine_reasons={},
        files=[],
    )


def _record_run(spark: SparkSession, lake: Lakehouse, report: IngestReport, started: datetime) -> None:
    row = (
        report.run_id,
        started,
        datetime.now(UTC),
        report.status,
        report.format,
        report.input,
        [(f["path"], f["fingerprint"], f["rows_in"], f["skipped"], f["size"], f["offset"], f["rows_total"])
         for f in report.files],
        report.rows_in,
        report.rows_clean,
        report.rows_quarantined,
        report.rows_duplicate,
        report.lines_in,
        report.quarantine_reasons,
        report.new_users,
        report.new_items,
        report.table_versions,
        lake.engine.name,
    )
    record = spark.createDataFrame([row], INGEST_RUNS_SCHEMA).coalesce(1)
    report.table_versions[OPS_INGEST_RUNS] = lake.write(record, OPS_INGEST_RUNS).version
