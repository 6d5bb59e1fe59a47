"""recsys-spark: batch + nearline recommendations on Spark, Delta Lake, PyTorch and MLflow."""

from __future__ import annotations

__version__ = "0.1.0"
