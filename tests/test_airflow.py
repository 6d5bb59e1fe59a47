"""The Airflow DAGs of ``airflow_dags/``, run for real by Airflow 3 from its own virtualenv
(``.venv-airflow``, ``make airflow-setup``): their structure, ``airflow dags test`` of
``recsys_daily`` day by day on a small synthetic log (a rerun changes nothing, the next day adds
its events only, a bad file fails ingest and stops the run, a missing day times out), the nearline
DAG starting the streaming query once, and a backfill run by Airflow's scheduler that gives the
same tables as the days run one by one.

The tests of this module build on each other (one lakehouse, days in order), as the DAG does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

AIRFLOW_VENV = REPO / ".venv-airflow"
AIRFLOW = AIRFLOW_VENV / "bin" / "airflow"
READY = (AIRFLOW_VENV / ".installed").is_file()
pytestmark = [
    pytest.mark.airflow,
    pytest.mark.skipif(not READY, reason=f"{AIRFLOW_VENV} was not built: `make airflow-setup` could not install "
                                         "airflow_dags/requirements-airflow.lock from PyPI"),
]

RECSYS = Path(sys.executable).parent / "recsys"
DAY1, DAY2, DAY3 = "2017-11-25", "2017-11-26", "2017-11-27"
BAD_DAY, MISSING_DAY = "2017-11-28", "2017-11-29"
PORT = 18080  # this suite's Airflow API server (its own port range)
CONFIG = """\
spark: {shuffle_partitions: 2}
storage: {engine: delta-rs}
training: {epochs: 2, num_processes: 1, sasrec: {dim: 16, ffn_dim: 32}}
logging: {level: WARNING}
serving: {stream: {format: taobao, trigger_seconds: 1}}
"""
# Small jobs: a C1-only, serial-GC driver JVM starts on half the CPU (maintain: 6.6 s instead of 12 s).
FAST_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
DAILY_TASKS = ["wait_for_input", "ingest", "features", "train", "gate", "score_batch", "maintain"]
DATA_TABLES = ["bronze/events_raw", "quarantine/events", "silver/events", "silver/user_index",
               "silver/item_index", "gold/item_features", "gold/user_features", "gold/user_sequences",
               "gold/training_examples", "serving/recommendations", "serving/item_embeddings"]


@dataclass
class World:
    folder: Path
    env: dict[str, str]
    landing: Path
    config: Path
    root: Path

    def conf(self, root: Path | None = None, **extra: object) -> dict[str, object]:
        # a challenger every second day: day 2 shows a skipped training
        return {"root": str(root or self.root), "landing": str(self.landing), "config": str(self.config),
                "train_every_days": 2, "train_anchor": DAY1, "driver_java_options": FAST_JVM, **extra}


def airflow(world_env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AIRFLOW), *args], env=world_env, capture_output=True, text=True, timeout=timeout)


def airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS", "AIRFLOW", "PYSPARK", "SPARK"))}
    return env | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "airflow_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_RECSYS_SPARK": json.dumps({"conn_type": "spark", "host": "local[2]"}),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    folder = tmp_path_factory.mktemp("airflow")
    env = airflow_env(folder / "airflow-home")
    migrated = airflow(env, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    landing = folder / "landing"
    generated = subprocess.run([str(RECSYS), "generate", "--users", "200", "--items", "120", "--days", "3",
                                "--seed", "7", "--daily", "--out", str(landing)], capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr
    (landing / f"date={BAD_DAY}").mkdir()
    (landing / f"date={BAD_DAY}" / "events.csv").write_bytes(b"\x00\x01 not a log\n\xff\xfe\n")
    config = folder / "conf.yaml"
    config.write_text(CONFIG)
    return World(folder, env, landing, config, folder / "lake")


def dags_test(world: World, dag_id: str, day: str | None, conf: dict[str, object]) -> tuple[int, str, dict[str, str]]:
    """``airflow dags test``: its exit code, output (the tasks' logs) and each task's final state."""
    done = airflow(world.env, "dags", "test", dag_id, *([day] if day else []), "-c", json.dumps(conf))
    return done.returncode, done.stdout + done.stderr, latest_states(world.env["AIRFLOW_HOME"], dag_id)


def latest_states(home: str, dag_id: str) -> dict[str, str]:
    with sqlite3.connect(f"{home}/airflow.db") as db:
        (run_id,) = db.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                               (dag_id,)).fetchone()
        return dict(db.execute("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                               (dag_id, run_id)).fetchall())


def xcom(home: str, dag_id: str, task_id: str) -> object:
    with sqlite3.connect(f"{home}/airflow.db") as db:
        (value,) = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value' "
            "ORDER BY dag_run_id DESC LIMIT 1", (dag_id, task_id)).fetchone()
    return json.loads(value)


def snapshot(root: Path, *, without: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every data table's rows, order-free (each row as sorted-key JSON), ``without`` columns."""
    from recsys_spark.storage import read_table

    return {table: sorted(json.dumps({k: v for k, v in row.items() if k not in without}, sort_keys=True, default=str)
                          for row in read_table(str(root), table).to_pylist())
            for table in DATA_TABLES}


def registry(root: Path) -> tuple[list[str], str | None]:
    """The registered versions and the champion's."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = sorted(str(v.version) for v in client.search_model_versions("name = 'recsys-recommender'"))
    try:
        champion = str(client.get_model_version_by_alias("recsys-recommender", "champion").version)
    except Exception:  # no alias
        champion = None
    return found, champion


def day_lines(world: World, day: str) -> int:
    return len((world.landing / f"date={day}" / "events.csv").read_text().splitlines())


def rows(root: Path, table: str) -> list[dict]:
    from recsys_spark.storage import read_table

    return read_table(str(root), table).to_pylist()


# --- structure ---------------------------------------------------------------------------------------


DAG_SHAPE = """
import json, pathlib
from airflow.dag_processing.dagbag import BundleDagBag
folder = pathlib.Path(%r)
bag = BundleDagBag(dag_folder=folder, bundle_path=folder, bundle_name="dags-folder")
print(json.dumps({"errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dags": {
    d.dag_id: {"schedule": [type(d.timetable).__name__, d.timetable.expression],
               "max_active_runs": d.max_active_runs, "catchup": d.catchup,
               "doc": bool(d.doc_md), "params": sorted(d.params.keys()),
               "tasks": {t.task_id: {"downstream": sorted(t.downstream_task_ids), "retries": t.retries,
                                     "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule), "owner": t.owner,
                                     "timeout": t.execution_timeout is not None, "doc": bool(t.doc_md),
                                     "type": type(t).__name__} for t in d.tasks}}
    for d in bag.dags.values()}}))
"""


def test_dags_import_and_have_the_expected_shape(world: World) -> None:
    done = subprocess.run([str(AIRFLOW_VENV / "bin" / "python"), "-c", DAG_SHAPE % str(REPO / "airflow_dags")],
                          env=world.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["errors"] == {} and sorted(found["dags"]) == ["recsys_daily", "recsys_nearline"]

    daily = found["dags"]["recsys_daily"]
    # the run of day D starts once D is over, and processes D
    assert daily["schedule"] == ["CronDataIntervalTimetable", "0 0 * * *"]
    assert (daily["max_active_runs"], daily["catchup"], daily["doc"]) == (1, False, True)
    tasks = daily["tasks"]
    assert sorted(tasks) == sorted(DAILY_TASKS)
    for upstream, downstream in itertools.pairwise(DAILY_TASKS):
        assert tasks[upstream]["downstream"] == [downstream], upstream
    assert tasks["maintain"]["downstream"] == []
    assert {t: s["type"] for t, s in tasks.items()} == {
        "wait_for_input": "DayFolderSensor", **dict.fromkeys(DAILY_TASKS[1:], "RecsysJobOperator")}
    assert all(s["owner"] == "recsys" and s["doc"] for s in tasks.values())
    assert all(s["retries"] == 2 and s["timeout"] for t, s in tasks.items() if t != "wait_for_input")
    assert tasks["wait_for_input"]["retries"] == 0  # it waits by itself; its timeout is a param
    assert tasks["score_batch"]["trigger_rule"] == "none_failed"  # also after a skipped training
    assert {"root", "config", "spark_conn_id", "landing", "train_every_days", "vacuum_weekday"} <= set(daily["params"])

    nearline = found["dags"]["recsys_nearline"]
    assert nearline["schedule"] == ["CronTriggerTimetable", "*/5 * * * *"]
    assert (nearline["max_active_runs"], nearline["catchup"], nearline["doc"]) == (1, False, True)
    assert {t: s["downstream"] for t, s in nearline["tasks"].items()} == {
        "check_stream": ["ensure_running"], "ensure_running": ["check_health"], "check_health": []}
    assert all(s["retries"] == 1 and s["timeout"] and s["owner"] == "recsys" for s in nearline["tasks"].values())
    assert {"max_latency_p95_seconds", "max_quarantine_rate", "max_batch_age_minutes"} <= set(nearline["params"])


# --- recsys_daily, day by day ----------------------------------------------------------------------


def test_first_day_runs_every_stage(world: World) -> None:
    code, output, states = dags_test(world, "recsys_daily", DAY1, world.conf())
    assert code == 0, output[-5000:]
    assert states == dict.fromkeys(DAILY_TASKS, "success")
    silver = rows(world.root, "silver/events")
    assert len(silver) > 0.9 * day_lines(world, DAY1) and {str(r["event_date"]) for r in silver} == {DAY1}
    users = {r["user_id"] for r in rows(world.root, "gold/user_sequences")}
    served = rows(world.root, "serving/recommendations")
    assert {r["user_id"] for r in served} == users and all(r["item_ids"] for r in served)
    assert {str(r["generated_at"]) for r in served} == {f"{DAY1} 23:59:59.999999+00:00"}
    assert registry(world.root) == (["1"], "1")
    home = world.env["AIRFLOW_HOME"]
    assert xcom(home, "recsys_daily", "train")["model_version"] == "1"  # the job's JSON, read by gate
    assert xcom(home, "recsys_daily", "gate")["decision"] == "promoted"


def test_the_same_day_again_changes_nothing(world: World) -> None:
    before = snapshot(world.root)
    code, output, states = dags_test(world, "recsys_daily", DAY1, world.conf())
    assert code == 0, output[-5000:]
    assert states == dict.fromkeys(DAILY_TASKS, "success")
    assert snapshot(world.root) == before
    assert registry(world.root) == (["1"], "1")  # the day's training run was reused
    assert xcom(world.env["AIRFLOW_HOME"], "recsys_daily", "train")["reused"] is True
    runs = sorted(rows(world.root, "ops/ingest_runs"), key=lambda r: r["attempt_started_at"])
    assert [r["status"] for r in runs] == ["succeeded", "skipped"] and runs[-1]["rows_clean"] == 0  # the attempt


def test_the_next_day_adds_its_events_only(world: World) -> None:
    before = snapshot(world.root)
    code, output, states = dags_test(world, "recsys_daily", DAY2, world.conf())
    assert code == 0, output[-5000:]
    # not a training day: train and gate are skipped, the champion scores the new day
    assert states == {**dict.fromkeys(DAILY_TASKS, "success"), "train": "skipped", "gate": "skipped"}
    assert "not a training day" in output
    after = snapshot(world.root)
    silver = rows(world.root, "silver/events")
    new = [r for r in silver if str(r["event_date"]) == DAY2]
    assert len(silver) == len(before["silver/events"]) + len(new) and len(new) > 0.9 * day_lines(world, DAY2)
    assert set(before["silver/events"]) <= set(after["silver/events"])  # day 1 untouched
    assert set(before["bronze/events_raw"]) <= set(after["bronze/events_raw"])
    assert len(after["bronze/events_raw"]) == len(before["bronze/events_raw"]) + day_lines(world, DAY2)
    served = rows(world.root, "serving/recommendations")
    assert {r["user_id"] for r in served} == {r["user_id"] for r in rows(world.root, "gold/user_sequences")}
    assert {(r["model_version"], str(r["generated_at"])) for r in served} == {("1", f"{DAY2} 23:59:59.999999+00:00")}
    assert registry(world.root) == (["1"], "1")


def test_a_bad_file_fails_ingest_with_its_one_line_error_and_changes_nothing(world: World) -> None:
    before = snapshot(world.root)
    code, output, states = dags_test(world, "recsys_daily", BAD_DAY, world.conf())
    assert code != 0
    assert states["wait_for_input"] == "success" and states["ingest"] == "failed"
    assert all(states[t] == "upstream_failed" for t in DAILY_TASKS[2:])
    error = f"error: nothing in {world.landing}/date={BAD_DAY}/events.csv parses as taobao"
    assert error in output  # the job's own line, in the task's log
    assert f"ingest failed: {error.removeprefix('error: ')}" in output  # and as the task's failure
    assert output.count("Spark-Submit cmd") == 1  # a bad file is not retried
    assert snapshot(world.root) == before


def test_a_day_without_input_times_out_naming_the_folder(world: World) -> None:
    code, output, states = dags_test(world, "recsys_daily", MISSING_DAY,
                                     world.conf(input_timeout_minutes=0.05, input_poke_seconds=1))
    assert code != 0
    assert states["wait_for_input"] == "failed" and states["ingest"] == "upstream_failed"
    assert f"no input arrived in {world.landing}/date={MISSING_DAY} within 0.05 minutes" in output


# --- backfill by the scheduler ---------------------------------------------------------------------
# Runs before the nearline test, which streams a third day into the daily runs' lakehouse: the
# backfill is compared with the days as they came, nothing else.


def test_a_backfill_runs_the_days_in_order_and_gives_the_same_tables(world: World) -> None:
    home = world.folder / "airflow-standalone"
    # no scheduled runs of today's interval beside the backfill: the scheduler runs queued runs only
    env = airflow_env(home) | {"AIRFLOW_PORT": str(PORT), "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
    del env["AIRFLOW_CONN_RECSYS_SPARK"]  # standalone.py creates the connection in the database
    server = subprocess.Popen([str(AIRFLOW_VENV / "bin" / "python"), str(REPO / "airflow_dags" / "standalone.py")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    backfilled = world.folder / "lake-backfilled"
    try:
        banner = _wait_for_banner(server)
        assert f"Airflow is up: http://127.0.0.1:{PORT}" in banner and "log in as admin, password" in banner
        connection = airflow(env, "connections", "get", "recsys_spark", "-o", "json")
        assert json.loads(connection.stdout)[0]["host"] == "local[*]"  # made by standalone.py
        backfill = ["backfill", "create", "--dag-id", "recsys_daily", "--from-date", DAY1, "--to-date", DAY2,
                    "--max-active-runs", "1", "--dag-run-conf", json.dumps(world.conf(root=backfilled))]
        deadline = time.monotonic() + 180
        while (unpaused := airflow(env, "dags", "unpause", "recsys_daily")).returncode != 0 \
                and time.monotonic() < deadline:
            time.sleep(5)  # until the DAG processor has parsed the DAG
        assert unpaused.returncode == 0, unpaused.stderr[-3000:]  # a paused DAG's backfill stays queued
        created = airflow(env, *backfill)
        assert created.returncode == 0, created.stderr[-3000:]
        runs = _wait_for_runs(home, "recsys_daily", 2, timeout=1500)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert [(r[0][:10], r[1]) for r in runs] == [(DAY1, "success"), (DAY2, "success")], runs
    assert runs[0][3] <= runs[1][2]  # in order: day 2 started after day 1 ended
    # bronze and quarantine rows record when they arrived (ingested_at, ingest_date): the rest is equal
    expected, actual = (snapshot(r, without=("ingested_at", "ingest_date")) for r in (world.root, backfilled))
    assert registry(backfilled) == registry(world.root)
    served, embedded = "serving/recommendations", "serving/item_embeddings"
    assert {t: rows for t, rows in actual.items() if t not in (served, embedded)} == {
        t: rows for t, rows in expected.items() if t not in (served, embedded)}
    # what the model computed: the same users, items, model version, time and sizes (the numbers are
    # those of a model trained in another process; see airflow_dags/README.md on training determinism)
    def lists(root: Path) -> list[tuple]:
        return sorted((r["user_id"], r["source"], r["model_version"], str(r["generated_at"]), len(r["item_ids"]))
                      for r in rows(root, served))

    def embeddings(root: Path) -> list[tuple]:
        return sorted((r["item_id"], r["item_idx"], r["model_name"], r["model_version"], len(r["embedding"]))
                      for r in rows(root, embedded))
    assert lists(backfilled) == lists(world.root)
    assert embeddings(backfilled) == embeddings(world.root)
    logs = list((home / "logs").rglob("*.log"))
    assert any("task_id=ingest" in str(p) for p in logs)  # the scheduler's runs keep task logs


def _wait_for_banner(server: subprocess.Popen[str], timeout: float = 300) -> str:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert server.stdout is not None
    os.set_blocking(server.stdout.fileno(), False)
    while time.monotonic() < deadline and server.poll() is None:
        line = server.stdout.readline()
        if not line:
            time.sleep(0.5)
            continue
        seen.append(line)
        if "Airflow is up" in line:
            os.set_blocking(server.stdout.fileno(), True)
            _drain(server)
            return line
    raise AssertionError("Airflow standalone did not come up:\n" + "".join(seen[-50:]))


def _drain(server: subprocess.Popen[str]) -> None:
    """Keep reading the server's output so that it never blocks on a full pipe."""
    import threading

    def read() -> None:
        assert server.stdout is not None
        for _ in server.stdout:
            pass

    threading.Thread(target=read, daemon=True).start()


def _wait_for_runs(home: Path, dag_id: str, count: int, timeout: float) -> list[tuple[str, str, str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(f"{home}/airflow.db") as db:
            found = db.execute("SELECT logical_date, state, start_date, end_date FROM dag_run WHERE dag_id = ? "
                               "ORDER BY logical_date", (dag_id,)).fetchall()
        if len(found) >= count and all(state in ("success", "failed") for _, state, _, _ in found):
            return found
        time.sleep(5)
    raise AssertionError(f"backfill runs not done after {timeout} s: {found}")


# --- recsys_nearline ---------------------------------------------------------------------------------


def _stream_status(world: World) -> dict:
    done = subprocess.run([str(RECSYS), "stream-status", "--json", "--root", str(world.root), "--config",
                           str(world.config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_nearline_starts_the_query_once_and_fails_on_thresholds(world: World) -> None:
    conf = {"root": str(world.root), "config": str(world.config), "driver_java_options": FAST_JVM}
    code, output, states = dags_test(world, "recsys_nearline", None, conf)
    started = xcom(world.env["AIRFLOW_HOME"], "recsys_nearline", "ensure_running")
    try:
        assert code == 0, output[-5000:]
        assert states == dict.fromkeys(["check_stream", "ensure_running", "check_health"], "success")
        assert started["started"] and _stream_status(world)["holder"]["pid"] == started["pid"]
        landed = subprocess.run([str(RECSYS), "replay", "--input", str(world.landing / f"date={DAY3}" / "events.csv"),
                                 "--format", "taobao", "--landing", str(world.root / "_landing"), "--rate", "200",
                                 "--limit", "200"], capture_output=True, text=True, timeout=120)
        assert landed.returncode == 0, landed.stderr
        deadline = time.monotonic() + 240
        while _stream_status(world)["rows_in"] < 200 and time.monotonic() < deadline:
            time.sleep(2)
        status = _stream_status(world)
        assert status["rows_in"] == 200 and status["running"]

        # running already: nothing started, the same query still holds the lock
        code, output, states = dags_test(world, "recsys_nearline", None, conf | {"max_latency_p95_seconds": 3600})
        assert code == 0, output[-5000:]
        assert "a query already runs" in output and states["check_health"] == "success"
        assert xcom(world.env["AIRFLOW_HOME"], "recsys_nearline", "ensure_running")["started"] is False
        assert _stream_status(world)["holder"]["pid"] == started["pid"]
        assert len(_group(started["process_group"])) > 0

        # a threshold passed: the health check fails and says which
        code, output, states = dags_test(world, "recsys_nearline", None, conf | {"max_latency_p95_seconds": 0.001})
        assert code != 0 and states["check_health"] == "failed"
        assert "nearline query unhealthy" in output and "p95 latency" in output and "> 0.001 s" in output
    finally:
        _stop(started)
    assert not _stream_status(world)["running"]


def _group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
            except ProcessLookupError:
                pass
    return found


def _stop(started: dict) -> None:
    """SIGTERM to the query's driver (it stops cleanly), then the rest of its process group."""
    with_pid = started.get("pid")
    if with_pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(with_pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while _group(started["process_group"]) and time.monotonic() < deadline:
        time.sleep(1)
    if _group(started["process_group"]):
        os.killpg(started["process_group"], signal.SIGKILL)
