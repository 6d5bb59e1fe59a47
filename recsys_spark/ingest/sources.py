"""Find the input files of an ingest and fingerprint their content.

A fingerprint identifies a file's bytes, so re-ingesting the same content (even renamed or
copied) is recognised and adds nothing, while a changed file is ingested anew.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from recsys_spark.errors import InputDataError


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    fingerprint: str


def discover_inputs(path: str | Path) -> list[InputFile]:
    """The files of ``path`` (a file, or a folder's visible files), fingerprinted.

    Raises:
        InputDataError: the path does not exist, holds no files, or every file is empty.
    """
    target = Path(path)
    if not target.exists():
        raise InputDataError(f"input not found: {target}")
    if target.is_dir():
        candidates = sorted(
            p for p in target.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
        )
        if not candidates:
            raise InputDataError(f"input folder {target} holds no files")
    else:
        candidates = [target]
    files = [InputFile(str(p.resolve()), p.stat().st_size, _sha256(p)) for p in candidates]
    if all(f.size == 0 for f in files):
        raise InputDataError(f"input is empty: {target}")
    return [f for f in files if f.size > 0]


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
