"""The whole pipeline on both storage engines: identical tables and model metrics from one input."""

from __future__ import annotations

import pytest

from recsys_spark.storage import Lakehouse, resolve_engine
from tests.conftest import HAVE_DELTA_JARS, NO_DELTA_JARS, PIPELINE_TABLES, assert_same_rows

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.delta_spark,
              pytest.mark.skipif(not HAVE_DELTA_JARS, reason=NO_DELTA_JARS)]


def test_whole_pipeline_gives_identical_tables_and_metrics_on_both_engines(spark, local_pipeline) -> None:
    rs_run, ds_run = local_pipeline("delta-rs"), local_pipeline("delta-spark")
    ingest = ds_run["ingest"]
    assert ingest["rows_in"] == ingest["rows_clean"] + ingest["rows_quarantined"] + ingest["rows_duplicate"]
    rs = Lakehouse(rs_run["root"], resolve_engine(spark, "delta-rs"))
    ds = Lakehouse(ds_run["root"], resolve_engine(spark, "delta-spark"))
    for table in PIPELINE_TABLES:  # each engine reads its own tables
        assert_same_rows(rs.read(table), ds.read(table), table)
    # the same model: trained on the same rows in the same order, it has the same metrics
    assert rs_run["train"]["test"] == ds_run["train"]["test"]
    assert rs_run["train"]["validation"] == ds_run["train"]["validation"]
    baselines = [[b["test"] for b in run["baselines"]["baselines"]] for run in (rs_run, ds_run)]
    assert baselines[0] == baselines[1]
    assert rs_run["score_batch"]["users"] == ds_run["score_batch"]["users"] > 0
    assert rs_run["stream"]["batches"] == ds_run["stream"]["batches"] >= 1
