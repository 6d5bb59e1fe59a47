"""Bronze -> silver ingest of behaviour logs (Taobao CSV, JSON lines, item sequences)."""

from __future__ import annotations

from recsys_spark.ingest.pipeline import IngestReport, run_ingest

__all__ = ["IngestReport", "run_ingest"]
