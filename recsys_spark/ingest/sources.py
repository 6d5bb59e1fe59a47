"""Find the input files of an ingest and fingerprint their content.

A fingerprint identifies a file's bytes, so re-ingesting the same content (even renamed or
copied) is recognised and adds nothing, while a changed file is ingested anew.

Local paths are listed and hashed (SHA-256) here. URIs (``hdfs://``, ``s3a://``, ``file://``)
are listed through Spark's Hadoop file system, and fingerprinted by the checksum the file
system keeps (HDFS: an MD5 of block CRCs), or, where it keeps none (S3A without etag
checksums, local files), by path, size and modification time: hashing would pull every byte
through the driver. A renamed copy of such a file is then read again, and its events count
as duplicates of silver's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from recsys_spark.errors import InputDataError
from recsys_spark.logs import get_logger, log_event_at
from recsys_spark.spark import hadoop_conf, jvm

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = get_logger("ingest.sources")

_HIDDEN = (".", "_")


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    fingerprint: str


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def local_path(path: str) -> str | None:
    """The local file behind ``path``, if it is one (Hadoop spells a listed local file
    ``file:/x``); None for remote URIs."""
    if path.startswith("file:"):
        return urlparse(path).path  # Hadoop prints paths decoded
    return None if is_uri(path) else path


def discover_inputs(
    path: str | Path, spark: SparkSession | None = None, *, lakehouse: str | None = None
) -> list[InputFile]:
    """The files of ``path`` (a file, or a folder's visible files at any depth), fingerprinted.

    Entries whose name starts with "." or "_" (temporary files, ``_SUCCESS`` markers, staging
    folders) are not input, as for Spark and Hadoop, and neither is the ``lakehouse`` root when
    it lies inside the folder. Symbolic links inside a folder are followed only to files and
    folders inside it: a link elsewhere (``/etc/passwd``) is skipped with a warning, never
    read. A URI needs ``spark`` (its Hadoop file systems).

    Raises:
        InputDataError: the path does not exist, holds no files, or every file is empty.
    """
    if is_uri(path):
        if spark is None:
            raise ValueError(f"listing {path} needs a Spark session")
        return _checked(str(path), _hadoop_files(spark, str(path), lakehouse))
    target = Path(path)
    if not target.exists():
        raise InputDataError(f"input not found: {target}")
    if target.is_dir():
        candidates = sorted({p.resolve() for p in _visible_files(target, lakehouse)})
        if not candidates:
            raise InputDataError(f"input folder {target} holds no files")
    else:
        candidates = [target.resolve()]
    return _checked(
        str(target), [InputFile(str(p), p.stat().st_size, _sha256(p)) for p in candidates]
    )


def _checked(target: str, files: list[InputFile]) -> list[InputFile]:
    if all(f.size == 0 for f in files):
        raise InputDataError(f"input is empty: {target}")
    return [f for f in files if f.size > 0]


def _hadoop_files(spark: SparkSession, uri: str, lakehouse: str | None) -> list[InputFile]:
    gateway, conf = jvm(spark), hadoop_conf(spark)
    root = gateway.org.apache.hadoop.fs.Path(uri)
    fs = root.getFileSystem(conf)
    if not fs.exists(root):
        raise InputDataError(f"input not found: {uri}")
    status = fs.getFileStatus(root)
    if not status.isDirectory():
        return [_hadoop_file(fs, status)]
    prefix = len(status.getPath().toString().rstrip("/")) + 1
    own = None  # the lakehouse's own files, as Hadoop spells them
    if lakehouse is not None:
        own_root = gateway.org.apache.hadoop.fs.Path(lakehouse)
        own = own_root.getFileSystem(conf).makeQualified(own_root).toString().rstrip("/") + "/"
    found = []
    listing = fs.listFiles(root, True)  # recursive
    while listing.hasNext():
        entry = listing.next()
        relative = entry.getPath().toString()[prefix:]
        if own is not None and entry.getPath().toString().startswith(own):
            continue
        if not any(part.startswith(_HIDDEN) for part in relative.split("/")):
            found.append(_hadoop_file(fs, entry))
    if not found:
        raise InputDataError(f"input folder {uri} holds no files")
    return sorted(found, key=lambda f: f.path)


def _hadoop_file(fs: Any, status: Any) -> InputFile:
    path = status.getPath()
    checksum = fs.getFileChecksum(path) if status.getLen() > 0 else None
    if checksum is not None:
        fingerprint = f"{checksum.getAlgorithmName()}:{bytes(checksum.getBytes()).hex()}"
    else:
        fingerprint = "stat:" + hashlib.sha256(
            f"{path.toString()}|{status.getLen()}|{status.getModificationTime()}".encode()
        ).hexdigest()
    return InputFile(path.toString(), int(status.getLen()), fingerprint)


def _visible_files(folder: Path, lakehouse: str | None) -> Iterator[Path]:
    top = os.path.realpath(folder)
    seen = {top}  # linked folders are followed, each real one once
    if lakehouse is not None and not is_uri(lakehouse):
        seen.add(os.path.realpath(lakehouse))
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in dirnames:
            entry = os.path.join(dirpath, name)
            real = os.path.realpath(entry)
            if not name.startswith(_HIDDEN) and real not in seen and _inside(entry, real, top):
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            entry = os.path.join(dirpath, name)
            if not name.startswith(_HIDDEN) and os.path.isfile(entry) and _inside(entry, os.path.realpath(entry), top):
                yield Path(entry)


def _inside(entry: str, real: str, top: str) -> bool:
    """Whether ``entry`` (resolving to ``real``) may be read as part of the folder ``top``."""
    if os.path.commonpath([real, top]) == top:
        return True
    log_event_at(log, logging.WARNING, "ingest.link_skipped", link=entry, target=real,
              reason="points outside the input folder")
    return False


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
