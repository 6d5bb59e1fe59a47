"""What a scheduler relies on (the Airflow DAGs in ``airflow_dags/``): a challenger trained and
gated in separate steps, training runs keyed by day so a rerun registers nothing new, batch lists
stamped with the scheduler's time, and one nearline query per checkpoint with a status report."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from recsys_spark.serving.stream_guard import hold_query_lock, lock_path, query_holder
from tests.conftest import REPO, build_gold_lakehouse, run_cli

pytestmark = pytest.mark.spark

REGISTERED = "recsys-recommender"
UNTRAINED = ["--model", "mf", "--set", "training.learning_rate=1e-7", "--set", "training.epochs=1",
             "--set", "training.num_processes=1", "--set", "training.mf.dim=8", "--set", "logging.level=WARNING"]


@pytest.fixture(scope="module")
def gold_root(spark, tmp_path_factory) -> str:
    return build_gold_lakehouse(tmp_path_factory.mktemp("scheduling"), users=150, items=100, seed=5)


def _client(root: str):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _json(capsys, *argv: str) -> dict:
    code, result, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err[-3000:]
    return result


def test_train_without_gate_then_gate_and_a_run_key_registers_once(gold_root: str, capsys) -> None:
    client = _client(gold_root)
    first = _json(capsys, "train", "--root", gold_root, "--no-gate", "--run-key", "daily/2017-11-25", *UNTRAINED)
    assert (first["model_version"], first["gated"], first["promoted"], first["reused"]) == ("1", False, False, False)
    assert "gate.decision" not in client.get_model_version(REGISTERED, "1").tags
    with pytest.raises(Exception, match="alias"):
        client.get_model_version_by_alias(REGISTERED, "champion")  # nothing promoted yet

    again = _json(capsys, "train", "--root", gold_root, "--no-gate", "--run-key", "daily/2017-11-25", *UNTRAINED)
    assert again["reused"] and {k: v for k, v in again.items() if k != "reused"} == {
        k: v for k, v in first.items() if k != "reused"}
    assert [str(v.version) for v in client.search_model_versions(f"name = '{REGISTERED}'")] == ["1"]

    gated = _json(capsys, "gate", "--root", gold_root)
    assert (gated["model_version"], gated["promoted"], gated["decision"]) == ("1", True, "promoted")
    assert gated["reason"] == "no champion yet" and gated["champion_version"] == "1"
    assert _json(capsys, "gate", "--root", gold_root, "--version", "1") == gated  # decided once

    # the next day's challenger (the same untrained model: no better) is compared, not promoted
    second = _json(capsys, "train", "--root", gold_root, "--no-gate", "--run-key", "daily/2017-11-26", *UNTRAINED)
    assert second["model_version"] == "2" and not second["reused"]
    kept = _json(capsys, "gate", "--root", gold_root, "--version", "2")
    assert (kept["promoted"], kept["decision"], kept["compared_with"]) == (False, "kept champion", "1")
    assert float(kept["champion_value"]) == pytest.approx(float(kept["challenger_value"]))
    assert kept["champion_version"] == "1"
    assert str(client.get_model_version_by_alias(REGISTERED, "challenger").version) == "2"

    code, _, err = run_cli(capsys, "gate", "--root", gold_root, "--version", "9")
    assert code == 1
    assert err.strip().splitlines()[-1] == "error: registered model 'recsys-recommender' has no version '9'"


def test_score_batch_stamped_with_a_given_time_rewrites_identical_rows(gold_root: str, capsys) -> None:
    from recsys_spark.storage import read_table

    def rows() -> list[dict]:
        table = read_table(gold_root, "serving/recommendations")
        return sorted(table.to_pylist(), key=lambda r: (r["user_id"], r["source"]))

    if not _client(gold_root).search_model_versions(f"name = '{REGISTERED}'"):
        _json(capsys, "train", "--root", gold_root, *UNTRAINED)
    stamp = "2017-12-04T23:59:59.999999+00:00"
    first = _json(capsys, "score-batch", "--root", gold_root, "--generated-at", stamp, "--set", "logging.level=WARNING")
    before = rows()
    assert {r["generated_at"] for r in before} == {datetime.fromisoformat(stamp)}
    second = _json(capsys, "score-batch", "--root", gold_root, "--generated-at", stamp,
                   "--set", "logging.level=WARNING")
    assert second["table_version"] > first["table_version"] and rows() == before


def _metrics(rows: list[tuple[datetime, int, int, float]]) -> pa.Table:
    from recsys_spark.serving.schemas import STREAM_METRICS_SCHEMA

    return pa.Table.from_pylist([
        {"batch_id": i, "committed_at": at, "rows_in": n, "rows_clean": n - q, "rows_quarantined": q,
         "users_updated": 1, "latency_p50_s": p95 / 2, "latency_p95_s": p95, "latency_max_s": p95,
         "processing_s": 0.5, "model_version": "1"} for i, (at, n, q, p95) in enumerate(rows)
    ], schema=STREAM_METRICS_SCHEMA)


def test_one_query_per_checkpoint_and_its_status(tmp_path: Path, capsys) -> None:
    from deltalake import write_deltalake

    root = str(tmp_path / "lake")
    Path(root, "ops").mkdir(parents=True)
    checkpoint = f"{root}/_checkpoints/nearline"
    status = _json(capsys, "stream-status", "--root", root)
    assert not status["running"] and status["batches"] == 0 and status["last_batch_at"] is None

    now = datetime.now(UTC)
    write_deltalake(f"{root}/ops/stream_metrics", _metrics([
        (now - timedelta(hours=2), 1000, 900, 30.0),  # outside the window: counted for freshness only
        (now - timedelta(seconds=120), 100, 5, 2.5), (now - timedelta(seconds=60), 300, 10, 1.5)]))
    status = _json(capsys, "stream-status", "--root", root, "--window", "600")
    assert not status["running"] and (status["batches"], status["rows_in"], status["rows_quarantined"]) == (2, 400, 15)
    assert status["quarantine_rate"] == pytest.approx(15 / 400) and status["latency_p95_s"] == 2.5
    assert 55 <= status["seconds_since_last_batch"] < 120
    with hold_query_lock(checkpoint) as record_phase:
        record_phase("running")
        holder = query_holder(checkpoint)
        assert holder["pid"] == os.getpid() and holder["phase"] == "running"
        status = _json(capsys, "stream-status", "--root", root, "--window", "600")
        assert status["running"] and status["holder"]["pid"] == os.getpid()
        assert status["seconds_since_last_batch"] < 30  # a query that just started is not stale

        # a second query on the checkpoint (here a real process) is refused with one line
        second = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "stream_score.py"), "--root", root, "--set", "spark.master=local[1]",
             "--set", "logging.level=WARNING"], capture_output=True, text=True, timeout=180,
            env={k: v for k, v in os.environ.items() if not k.startswith("RECSYS__")} | {
                "RECSYS__STORAGE__ENGINE": "delta-rs"})
        assert second.returncode == 1, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"error: a nearline query already runs on checkpoint {checkpoint} (pid {os.getpid()} ")
    assert query_holder(checkpoint) is None and lock_path(checkpoint).read_text() == ""
    assert not _json(capsys, "stream-status", "--root", root)["running"]
