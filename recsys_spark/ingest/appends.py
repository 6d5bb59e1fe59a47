"""A log file that grew since it was ingested: only its new lines are read.

Logs are often appended to and ingested again (a day's file, re-sent as it grows). Read whole,
its old lines would be parsed again: good ones would count as duplicates of silver, but bad
ones would be quarantined a second time and every line would land in bronze again. So a local,
uncompressed file whose first bytes are exactly a file ingested before under the same path
(same SHA-256, ending at a line break) is read from where that ingest ended, through a copy of
the new bytes.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from recsys_spark.ingest.sources import InputFile, local_path

# Appending to a compressed stream does not append lines to its text.
_COMPRESSED = {".gz", ".bz2", ".zst", ".xz", ".deflate", ".lz4", ".snappy", ".zip"}
_COPY_BYTES = 8 << 20


@dataclass(frozen=True)
class IngestedFile:
    """What ``ops/ingest_runs`` remembers of a file a successful run read."""

    path: str
    fingerprint: str
    size: int
    rows_total: int  # rows of the whole file: of this run and of the ingests it was appended to


@dataclass(frozen=True)
class Append:
    """``file`` is an ingested file with lines appended: read from ``offset`` on."""

    offset: int
    rows_before: int


def find_append(file: InputFile, ingested: list[IngestedFile]) -> Append | None:
    """The largest earlier ingest of ``file``'s path that ``file`` extends, if any."""
    local = local_path(file.path)
    if local is None or Path(local).suffix.lower() in _COMPRESSED:
        return None
    earlier = sorted((f for f in ingested if f.path == file.path and 0 < f.size < file.size),
                     key=lambda f: f.size, reverse=True)
    if not earlier:
        return None
    with open(local, "rb") as handle:
        for candidate in earlier:
            handle.seek(candidate.size - 1)
            if handle.read(1) not in (b"\n", b"\r"):
                continue  # that ingest ended inside a line, which the append may continue
            handle.seek(0)
            if _prefix_sha256(handle, candidate.size) == candidate.fingerprint:
                return Append(candidate.size, candidate.rows_total)
    return None


def copy_tail(path: str, offset: int, target: Path) -> str:
    """Copy the bytes of the local file ``path`` from ``offset`` on to ``target``; returns its path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(local_path(path) or path, "rb") as src, open(target, "wb") as dst:
        src.seek(offset)
        shutil.copyfileobj(src, dst, _COPY_BYTES)
    return str(target)


def _prefix_sha256(handle: BinaryIO, size: int) -> str:
    digest = hashlib.sha256()
    remaining = size
    while remaining:
        chunk = handle.read(min(_COPY_BYTES, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    return digest.hexdigest()
