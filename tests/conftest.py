"""Shared fixtures: one local Spark session for the whole run, a fresh lakehouse per test."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from recsys_spark.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
JARS_DIR = REPO / ".jars" / "spark"
HAVE_DELTA_JARS = any(JARS_DIR.glob("delta-spark_*.jar"))
NO_DELTA_JARS = (f"Delta's jars are not in {JARS_DIR}: `make setup` could not fetch them from Maven "
                 "Central (see .jars/fetch.log)")
# Tests run on the embedded engine unless they ask for another; the shared session carries
# Delta's jars (when fetched) so that the delta-spark cases can run in it too.
TEST_OVERRIDES = [
    "spark.master=local[2]",
    "spark.shuffle_partitions=2",
    "spark.driver_memory=2g",
    "logging.level=WARNING",
    "storage.engine=delta-rs",
    f"spark.jars_dir={JARS_DIR}",
]
# Commands run in-process (and test subprocesses) read their engine from the environment too:
# the shared session holds Delta's jars, so `auto` would pick delta-spark for every CLI test.
os.environ["RECSYS__STORAGE__ENGINE"] = "delta-rs"
ENGINES = [
    pytest.param("delta-rs", id="delta-rs"),
    pytest.param("delta-spark", id="delta-spark", marks=[
        pytest.mark.delta_spark, pytest.mark.slow,  # Delta's own planning: seconds per small commit
        pytest.mark.skipif(not HAVE_DELTA_JARS, reason=NO_DELTA_JARS)]),
]


# Fixtures that bring a part with them, and the marker a test using them carries (so that
# ``-m "not spark"`` and friends select exactly the tests that need the part).
MARKED_FIXTURES = {
    "spark": ("spark",),
    "lake": ("spark",),
    "gold_root": ("spark", "integration", "mlflow"),
    "served": ("spark", "integration", "mlflow"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in MARKED_FIXTURES.get(fixture, ()):
                item.add_marker(marker)


QUIET = ["--set", "logging.level=WARNING"]
TINY = ["--set", "training.epochs=2", "--set", "training.sasrec.dim=16", "--set", "training.sasrec.ffn_dim=32",
        "--set", "training.num_processes=1", *QUIET]


def make_settings(root: Path, *extra: str) -> Settings:
    """Settings for tests: built-in defaults plus small Spark, never the caller's environment."""
    return load_settings(
        REPO / "conf" / "local.yaml",
        overrides=[*TEST_OVERRIDES, *extra],
        root=root,
        environ={},
    )


@pytest.fixture(autouse=True)
def _log_handlers_of_this_test_only() -> Iterator[None]:
    """A command run in-process points the project's log handler at the test's captured stderr;
    a later test's in-process stream would log into that closed stream ("Logging error")."""
    yield
    logging.getLogger("recsys").handlers.clear()


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from recsys_spark.spark import get_spark

    engine = "delta-spark" if HAVE_DELTA_JARS else "delta-rs"
    # a Kafka source's session: the connector's jars too, for the kafka tests' in-process queries
    session = get_spark(make_settings(tmp_path_factory.mktemp("spark"), f"storage.engine={engine}",
                                      "serving.stream.source=kafka"))
    yield session
    session.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "lake")


@pytest.fixture
def lake(spark: object, settings: Settings) -> object:
    from recsys_spark.storage import open_lakehouse

    return open_lakehouse(spark, settings)


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip: a fresh clone of the project has no shared/ folder."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (it lives beside the repo on the project's machines only)")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    """Run ``recsys`` in-process (sharing the test Spark session); return code, JSON, stderr."""
    from recsys_spark.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    result = json.loads(lines[-1]) if lines and "--json" in argv and code == 0 else None
    return code, result, captured.err


def build_gold_lakehouse(folder: Path, *, users: int, items: int, seed: int) -> str:
    """A lakehouse with ingested synthetic events and gold tables, built through the CLI."""
    from recsys_spark.cli import main
    from recsys_spark.generate import GeneratorConfig, write_log

    log = folder / "events.csv"
    write_log(GeneratorConfig(users=users, items=items, days=10, seed=seed), log)
    root = str(folder / "lake ü")  # a space and a non-ASCII letter, as in many home folders
    quiet = ["--set", "logging.level=WARNING"]
    assert main(["ingest", "--format", "taobao", "--input", str(log), "--root", root, *quiet]) == 0
    assert main(["features", "--root", root, *quiet]) == 0
    return root


@pytest.fixture(scope="session")
def served(spark, tmp_path_factory) -> dict:
    """A lakehouse with gold tables and a registered sasrec champion, a pristine copy of it (tests
    that write copy that), and a fresh log of the same users and items to stream."""
    from recsys_spark.cli import main
    from recsys_spark.generate import GeneratorConfig, write_log

    folder = tmp_path_factory.mktemp("serving")
    root = build_gold_lakehouse(folder, users=200, items=150, seed=11)
    assert main(["train", "--model", "sasrec", "--root", root, *TINY]) == 0
    pristine = folder / "pristine"
    shutil.copytree(root, pristine)
    stream_log = folder / "stream.jsonl"
    write_log(GeneratorConfig(users=200, items=150, days=1, seed=12), stream_log, fmt="jsonl",
              malformed_rate=0.05)
    return {"root": root, "pristine": pristine, "folder": folder, "stream_log": stream_log}


# --- the whole pipeline on one small input, for comparisons across engines and with the cluster ---

# Settings of every pipeline run compared across engines and with the cluster: tiny, quick models.
PIPELINE_SETTINGS = ("training.epochs=2", "training.sasrec.dim=16", "training.sasrec.ffn_dim=32",
                     "serving.stream.trigger_seconds=0.5")
PIPELINE_BASELINES = ("popularity", "itemcf")
# Columns that record when or by which run a row was written: they differ between any two runs.
RUN_COLUMNS = {"ingested_at", "quarantined_at", "computed_at", "generated_at", "updated_at", "committed_at",
               "ingest_run_id", "feature_run_id", "run_id"}
# Tables compared row for row (ops/ tables hold timings and run ids).
PIPELINE_TABLES = ("bronze/events_raw", "quarantine/events", "silver/events", "silver/user_index",
                   "silver/item_index", "gold/user_features", "gold/item_features", "gold/user_sequences",
                   "gold/training_examples", "serving/recommendations", "serving/item_embeddings",
                   "serving/user_state")


def cli_json(*argv: str) -> dict:
    """``recsys ARGV --json`` in-process (sharing the test Spark session); its result, or fail."""
    from recsys_spark.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--json"])
    assert code == 0, f"recsys {' '.join(argv)} exited {code}:\n{err.getvalue()[-3000:]}"
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="session")
def pipeline_input(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small input for every whole-pipeline run: an event log with bad lines, and fresh
    events (and bad lines) for the stream."""
    from recsys_spark.generate import GeneratorConfig, write_log

    folder = tmp_path_factory.mktemp("pipeline-input")
    write_log(GeneratorConfig(users=200, items=150, days=6, seed=5), folder / "events.csv", malformed_rate=0.03)
    write_log(GeneratorConfig(users=200, items=150, days=1, seed=6), folder / "fresh.jsonl", fmt="jsonl",
              malformed_rate=0.05)
    return {"events": folder / "events.csv", "fresh": folder / "fresh.jsonl"}


def land(fresh: Path, landing: Path) -> None:
    """Put the stream's events into ``landing`` as one file, whole (written aside, then renamed)."""
    landing.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fresh, landing / ".fresh.jsonl")
    (landing / ".fresh.jsonl").rename(landing / "fresh.jsonl")


@pytest.fixture(scope="session")
def local_pipeline(spark: object, pipeline_input: dict[str, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """``local_pipeline(engine)``: ingest -> features -> train -> baselines -> score-batch -> a short
    stream on ``pipeline_input`` in local mode on that engine, run once per session; the root and
    every stage's result."""
    runs: dict[str, dict] = {}

    def run(engine: str) -> dict:
        if engine not in runs:
            root = str(tmp_path_factory.mktemp(f"pipeline-{engine}") / "lake")
            common = ["--root", root, "--set", f"storage.engine={engine}", "--set", "logging.level=WARNING",
                      *(a for kv in PIPELINE_SETTINGS for a in ("--set", kv))]
            result = {"root": root}
            result["ingest"] = cli_json("ingest", "--format", "taobao", "--input", str(pipeline_input["events"]),
                                        *common)
            result["features"] = cli_json("features", *common)
            result["train"] = cli_json("train", "--model", "sasrec", *common)
            result["baselines"] = cli_json("baselines", *PIPELINE_BASELINES, *common)
            result["score_batch"] = cli_json("score-batch", *common)
            land(pipeline_input["fresh"], Path(root) / "_landing")
            result["stream"] = cli_json("stream", "--until-idle", "3", "--timeout", "300", *common)
            runs[engine] = result
        return runs[engine]

    return run


def comparable(df):
    """``df`` without the columns that differ between any two runs of the same input (run times and
    ids, map columns), and with file paths reduced to their names (each run has its own root)."""
    from pyspark.sql import functions as F

    kept = []
    for field in df.schema.fields:
        if field.name in RUN_COLUMNS or field.dataType.typeName() == "map":
            continue
        if field.name == "source_file":
            kept.append(F.regexp_extract(field.name, r"([^/]*)$", 1).alias(field.name))
        else:
            kept.append(F.col(field.name))
    return df.select(*kept)


def assert_same_rows(a, b, table: str) -> None:
    a, b = comparable(a), comparable(b)
    assert a.columns == b.columns, table
    assert a.count() == b.count() > 0, table
    assert a.exceptAll(b).count() == 0 and b.exceptAll(a).count() == 0, table
