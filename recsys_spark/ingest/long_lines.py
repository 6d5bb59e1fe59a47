"""Lines longer than ``ingest.max_line_bytes``, found without holding them in memory.

Spark's line reader keeps a whole line in memory: one 200 MB line without a newline kills the
JVM. So each local input file is scanned in chunks first, and a file with a too-long line is
read by Spark from a stand-in copy in which each such line is replaced by a short marker
line: a marker unique to the run, the line's length and its first bytes. ``marked_lines``
turns a marker back into the line's first bytes and its length, which the parser quarantines
as ``line_too_long``. Lines end at ``\\n``, ``\\r`` or ``\\r\\n``, as for Spark's reader, so the
copy splits into the same lines; ``.gz``, ``.bz2`` and ``.zst`` files are scanned decompressed,
as Spark reads them.

Not scanned, so read whole (their too-long lines are still quarantined, as long as they fit
in memory): URIs (``hdfs://``, ``s3a://``), and files in the codecs whose framing only
Hadoop reads (``.deflate``, ``.lz4``, ``.snappy``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
from pyspark.sql import Column
from pyspark.sql import functions as F

from recsys_spark.ingest.sources import local_path

PREVIEW_BYTES = 256  # of a too-long line, kept in bronze and quarantine
_CHUNK_BYTES = 8 << 20
_LENGTH_DIGITS = 20
_DECOMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
_HADOOP_ONLY_CODECS = {".deflate", ".lz4", ".snappy"}


@dataclass(frozen=True)
class LineMarker:
    """``<prefix><20-digit length>:<first bytes>``: the stand-in of one too-long line. The
    prefix holds a random token, so no line of the input can pass for a marker."""

    prefix: bytes

    @classmethod
    def new(cls) -> LineMarker:
        return cls(b"\x00recsys-line-too-long:" + secrets.token_hex(8).encode() + b":")

    def line(self, length: int, head: bytes) -> bytes:
        return self.prefix + str(length).zfill(_LENGTH_DIGITS).encode() + b":" + head[:PREVIEW_BYTES]


@dataclass(frozen=True)
class LineSource:
    """What Spark reads (``read``) for the input file ``source``."""

    read: str
    source: str


def guard_long_lines(
    sources: list[LineSource], folder: Path | None, *, max_line_bytes: int, marker: LineMarker
) -> list[LineSource]:
    """The files to read: each local file with a line over ``max_line_bytes`` replaced by a
    stand-in copy in ``folder`` (``None``: no local folder, files are read as they are)."""
    guarded = []
    for number, source in enumerate(sources):
        read = source.read
        if folder is not None and _scannable(read) and _has_long_line(read, max_line_bytes):
            folder.mkdir(parents=True, exist_ok=True)
            read = str(folder / f"{number}.txt")
            with _open(source.read) as src, open(read, "wb") as dst:
                _copy_with_markers(src, dst, max_line_bytes, marker)
        guarded.append(LineSource(read=read, source=source.source))
    return guarded


def marked_lines(value: Column, marker: LineMarker | None) -> tuple[Column, Column]:
    """(raw text, length of the line in bytes) of each line Spark read: a marker line stands for
    the too-long line whose first bytes it carries."""
    length = F.octet_length(value).cast("long")
    if marker is None:
        return value, length
    data = value.cast("binary")
    size = len(marker.prefix)
    is_marker = F.substring(data, 1, size) == F.lit(marker.prefix)
    marked_length = F.substring(data, size + 1, _LENGTH_DIGITS).cast("string").cast("long")
    head = F.substring(data, size + _LENGTH_DIGITS + 2, PREVIEW_BYTES).cast("string")
    return F.when(is_marker, head).otherwise(value), F.when(is_marker, marked_length).otherwise(length)


def _scannable(path: str) -> bool:
    return local_path(path) is not None and Path(path).suffix.lower() not in _HADOOP_ONLY_CODECS


def _open(path: str) -> BinaryIO:
    codec = _DECOMPRESSED.get(Path(path).suffix.lower())
    return pa.input_stream(local_path(path), compression=codec)


def _separators(chunk: bytes) -> np.ndarray:
    data = np.frombuffer(chunk, dtype=np.uint8)
    return np.flatnonzero((data == 0x0A) | (data == 0x0D))


def _has_long_line(path: str, limit: int) -> bool:
    run = 0  # bytes of the line still open at the end of the previous chunk
    with _open(path) as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            seps = _separators(chunk)
            if not len(seps):
                run += len(chunk)
            else:
                inner = np.diff(seps) - 1
                if run + int(seps[0]) > limit or (len(inner) and int(inner.max()) > limit):
                    return True
                run = len(chunk) - int(seps[-1]) - 1
            if run > limit:
                return True
    return False


class _OpenLine:
    """The line still open at a chunk's end: its bytes while short enough, else its head."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.length = 0
        self.data = bytearray()
        self.head: bytes | None = None

    def extend(self, part: bytes) -> None:
        self.length += len(part)
        if self.head is None:
            self.data += part
            if self.length > self.limit:
                self.head, self.data = bytes(self.data[:PREVIEW_BYTES]), bytearray()

    def close(self, marker: LineMarker) -> bytes:
        text = bytes(self.data) if self.head is None else marker.line(self.length, self.head)
        self.length, self.data, self.head = 0, bytearray(), None
        return text


def _copy_with_markers(src: BinaryIO, dst: BinaryIO, limit: int, marker: LineMarker) -> None:
    """Copy ``src`` to ``dst`` byte for byte, but for each line over ``limit`` bytes: a marker."""
    open_line = _OpenLine(limit)
    while chunk := src.read(_CHUNK_BYTES):
        seps = _separators(chunk)
        if not len(seps):
            open_line.extend(chunk)
            continue
        open_line.extend(chunk[: seps[0]])
        dst.write(open_line.close(marker))
        starts, ends = seps[:-1] + 1, seps[1:]
        position = int(seps[0])
        for i in np.flatnonzero(ends - starts > limit):
            start, end = int(starts[i]), int(ends[i])
            dst.write(chunk[position:start])  # short lines and separators as they are
            dst.write(marker.line(end - start, chunk[start : start + PREVIEW_BYTES]))
            position = end
        dst.write(chunk[position : int(seps[-1]) + 1])
        open_line.extend(chunk[int(seps[-1]) + 1 :])
    dst.write(open_line.close(marker))
