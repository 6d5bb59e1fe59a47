"""The same pipeline on both storage engines: identical tables from the same input."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_spark.constants import (
    GOLD_ITEM_FEATURES,
    GOLD_TRAINING_EXAMPLES,
    GOLD_USER_FEATURES,
    GOLD_USER_SEQUENCES,
    QUARANTINE_EVENTS,
    SILVER_EVENTS,
    SILVER_ITEM_INDEX,
    SILVER_USER_INDEX,
)
from recsys_spark.generate import GeneratorConfig, write_log
from recsys_spark.storage import Lakehouse, resolve_engine
from tests.conftest import HAVE_DELTA_JARS, NO_DELTA_JARS, run_cli

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.delta_spark,
              pytest.mark.skipif(not HAVE_DELTA_JARS, reason=NO_DELTA_JARS)]

COMPARED = (SILVER_EVENTS, SILVER_USER_INDEX, SILVER_ITEM_INDEX, QUARANTINE_EVENTS, GOLD_USER_FEATURES,
            GOLD_ITEM_FEATURES, GOLD_USER_SEQUENCES, GOLD_TRAINING_EXAMPLES)
# written at run time, so they differ between any two runs
RUN_TIME_COLUMNS = {"ingested_at", "quarantined_at", "computed_at", "generated_at"}


def comparable(df):
    kept = [f.name for f in df.schema.fields
            if f.name not in RUN_TIME_COLUMNS and f.dataType.typeName() != "map"]
    return df.select(*kept)


@pytest.mark.slow
def test_ingest_and_features_give_identical_tables_on_both_engines(spark, tmp_path: Path, capsys) -> None:
    log = tmp_path / "events.csv"
    write_log(GeneratorConfig(users=200, items=150, days=6, seed=5), log, malformed_rate=0.03)
    roots = {}
    for engine in ("delta-rs", "delta-spark"):
        root = str(tmp_path / engine)
        engine_set = ("--set", f"storage.engine={engine}", "--set", "logging.level=WARNING")
        code, report, err = run_cli(capsys, "ingest", "--format", "taobao", "--input", str(log), "--root", root,
                                    "--json", *engine_set)
        assert code == 0, err[-3000:]
        assert report["rows_in"] == report["rows_clean"] + report["rows_quarantined"] + report["rows_duplicate"]
        code, _, err = run_cli(capsys, "features", "--root", root, "--json", *engine_set)
        assert code == 0, err[-3000:]
        roots[engine] = root
    rs = Lakehouse(roots["delta-rs"], resolve_engine(spark, "delta-rs"))
    ds = Lakehouse(roots["delta-spark"], resolve_engine(spark, "delta-spark"))
    for table in COMPARED:
        a, b = comparable(rs.read(table)), comparable(ds.read(table))
        assert a.columns == b.columns, table
        assert a.count() == b.count() > 0, table
        assert a.exceptAll(b).count() == 0 and b.exceptAll(a).count() == 0, table
