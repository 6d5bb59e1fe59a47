"""Silver -> gold: user/item features, user sequences and training examples."""

from __future__ import annotations

from recsys_spark.features.pipeline import FeatureReport, build_features

__all__ = ["FeatureReport", "build_features"]
