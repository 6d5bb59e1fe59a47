"""Find the input files of an ingest and fingerprint their content.

A fingerprint identifies a file's bytes, so re-ingesting the same content (even renamed or
copied) is recognised and adds nothing, while a changed file is ingested anew.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from recsys_spark.errors import InputDataError

_HIDDEN = (".", "_")


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    fingerprint: str


def discover_inputs(path: str | Path) -> list[InputFile]:
    """The files of ``path`` (a file, or a folder's visible files at any depth), fingerprinted.

    Entries whose name starts with "." or "_" (temporary files, ``_SUCCESS`` markers, staging
    folders) are not input, as for Spark and Hadoop.

    Raises:
        InputDataError: the path does not exist, holds no files, or every file is empty.
    """
    target = Path(path)
    if not target.exists():
        raise InputDataError(f"input not found: {target}")
    if target.is_dir():
        candidates = sorted({p.resolve() for p in _visible_files(target)})
        if not candidates:
            raise InputDataError(f"input folder {target} holds no files")
    else:
        candidates = [target]
    files = [InputFile(str(p.resolve()), p.stat().st_size, _sha256(p)) for p in candidates]
    if all(f.size == 0 for f in files):
        raise InputDataError(f"input is empty: {target}")
    return [f for f in files if f.size > 0]


def _visible_files(folder: Path) -> Iterator[Path]:
    seen = {os.path.realpath(folder)}  # linked folders are followed, each real one once
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in dirnames:
            real = os.path.realpath(os.path.join(dirpath, name))
            if not name.startswith(_HIDDEN) and real not in seen:
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            if not name.startswith(_HIDDEN) and os.path.isfile(file := os.path.join(dirpath, name)):
                yield Path(file)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
