"""recsys_nearline: keeps the nearline streaming query alive and watched."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
from airflow.sdk import DAG, CronTriggerTimetable, Param, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from recsys_airflow import (
    DEFAULT_ARGS,
    SETTING_PARAMS,
    common_args,
    driver_conf,
    job_environment,
    project_venv,
    run_recsys,
    setting,
    spark_connection,
)

DOC = """
### recsys_nearline — the streaming query, kept alive and watched

Every 5 minutes (one run at a time):

| task | what it does |
|---|---|
| `check_stream` | `recsys stream-status`: does a query hold the checkpoint's lock (`<checkpoint>.lock`), and what did `ops/stream_metrics` record in the last `window_minutes` |
| `ensure_running` | when no query runs: starts `spark-submit jobs/stream_score.py` detached (its own session, output appended to `stream_log`, default `<checkpoint>.log`) and waits until it holds the lock and its query started; when one runs, starts nothing. The query itself refuses to run twice on one checkpoint |
| `check_health` | fails, naming each threshold passed, when the newest micro-batch is older than `max_batch_age_minutes` (counted from the query's start if it committed none since), the worst micro-batch p95 latency in the window passes `max_latency_p95_seconds`, or the quarantined share of its rows passes `max_quarantine_rate` |

Stop the query with `kill <pid>` (SIGTERM: it finishes what has landed, then stops); the pid is in
`check_stream`'s XCom and in `recsys stream-status`.
"""


def _status(params: dict[str, Any]) -> dict[str, Any]:
    return run_recsys(params, "stream-status", "--window", str(float(params["window_minutes"]) * 60))


def _launch(params: dict[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
    """``spark-submit jobs/stream_score.py`` in a session of its own (it outlives this task),
    its output appended to ``log_path``."""
    venv = project_venv(params)
    conn_id = spark_connection(params)
    master = SparkSubmitHook(conn_id=conn_id)._connection["master"]
    extra = []
    for option in ("landing", "format"):
        if params.get(f"stream_{option}"):
            extra += [f"--{option}", params[f"stream_{option}"]]
    hook = SparkSubmitHook(conn_id=conn_id, name="recsys-stream", driver_memory=params.get("driver_memory") or None,
                           conf=driver_conf(params, master), application_args=[*extra, *common_args(params, master)])
    command = hook._build_spark_submit_command(str(Path(setting("project", params)) / "jobs" / "stream_score.py"))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **job_environment(venv, master)})


with DAG(
    dag_id="recsys_nearline",
    description="keeps the nearline query running; fails on stale metrics, high latency or quarantine",
    doc_md=DOC,
    schedule=CronTriggerTimetable("*/5 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=20),
    default_args={**DEFAULT_ARGS, "retries": 1, "retry_delay": timedelta(seconds=30),
                  "execution_timeout": timedelta(minutes=10)},
    tags=["recsys", "nearline"],
    params={
        **SETTING_PARAMS,
        "stream_landing": Param(None, type=["null", "string"],
                                description="recsys stream --landing (default: serving.stream.landing)"),
        "stream_format": Param(None, type=["null", "string"], enum=[None, "taobao", "jsonl"],
                               description="recsys stream --format (default: serving.stream.format)"),
        "stream_log": Param(None, type=["null", "string"], description="the query's log (default: <checkpoint>.log)"),
        "start_timeout_seconds": Param(300, type="number", exclusiveMinimum=0,
                                       description="how long ensure_running waits for a started query"),
        "window_minutes": Param(15, type="number", exclusiveMinimum=0,
                                description="the micro-batches check_health looks at"),
        "max_batch_age_minutes": Param(30, type=["null", "number"],
                                       description="fail when the newest micro-batch is older (null: never; "
                                                   "set it for sources that are never idle that long)"),
        "max_latency_p95_seconds": Param(10, type="number", exclusiveMinimum=0,
                                         description="fail when a micro-batch's p95 event-to-serving latency is higher"),
        "max_quarantine_rate": Param(0.05, type="number", minimum=0, maximum=1,
                                     description="fail when a larger share of the window's rows was quarantined"),
    },
) as dag:

    @task(doc_md="`recsys stream-status`: is a query running, and its recent micro-batches.")
    def check_stream(params: dict[str, Any] | None = None) -> dict[str, Any]:
        status = _status(params)
        holder = status["holder"] or {}
        print(f"query {'running: pid ' + str(holder.get('pid')) if status['running'] else 'not running'}; "
              f"{status['batches']} micro-batches in the window, last at {status['last_batch_at']}")
        return status

    @task(doc_md="Starts the query when none runs (never a second one); waits until it runs.")
    def ensure_running(status: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        if status["running"]:
            print(f"a query already runs (pid {status['holder'].get('pid')}): starting none")
            return {"started": False, **status["holder"]}
        log_path = Path(params.get("stream_log") or f"{status['checkpoint']}.log")
        process = _launch(params, log_path)
        print(f"started spark-submit jobs/stream_score.py (process group {process.pid}); log: {log_path}")
        deadline = time.monotonic() + float(params["start_timeout_seconds"])
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
                errors = [line for line in tail if line.startswith("error:")]
                raise AirflowException(
                    f"the query exited with code {process.returncode} before it ran: "
                    f"{errors[-1] if errors else ' | '.join(tail[-5:])} (log: {log_path})")
            holder = _status(params)["holder"]
            if holder and holder.get("phase") == "running":
                print(f"query running: pid {holder['pid']} since {holder['started_at']}")
                return {"started": True, "process_group": process.pid, "log": str(log_path), **holder}
            time.sleep(2)
        os.killpg(process.pid, signal.SIGTERM)  # it never got going: do not leave it half-started
        raise AirflowException(f"the query did not start within {params['start_timeout_seconds']} s (log: {log_path})")

    @task(doc_md="Fails, naming each threshold passed, on stale metrics, high latency or quarantine.")
    def check_health(started: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        status = _status(params)
        if not status["running"]:
            raise AirflowException("no query holds the checkpoint's lock any more (it stopped after starting)")
        problems = []
        age, max_age = status["seconds_since_last_batch"], params.get("max_batch_age_minutes")
        if max_age is not None and age is not None and age > float(max_age) * 60:
            problems.append(f"the newest micro-batch is {age:.0f} s old (max {float(max_age) * 60:.0f} s)")
        p95 = status["latency_p95_s"]
        if p95 is not None and p95 > float(params["max_latency_p95_seconds"]):
            problems.append(f"p95 latency {p95:.2f} s > {params['max_latency_p95_seconds']} s")
        rate = status["quarantine_rate"]
        if rate is not None and rate > float(params["max_quarantine_rate"]):
            problems.append(f"quarantine rate {rate:.2%} > {float(params['max_quarantine_rate']):.2%} "
                            f"({status['rows_quarantined']} of {status['rows_in']} rows)")
        if problems:
            raise AirflowFailException(f"nearline query unhealthy ({status['batches']} micro-batches in the last "
                                       f"{params['window_minutes']} min): " + "; ".join(problems))
        print(f"healthy: {status['batches']} micro-batches, p95 {p95}, quarantine rate {rate}")
        return status

    check_health(ensure_running(check_stream()))
