"""What the recsys DAGs share: where things are, the stage operator and the input sensor.

This runs inside Airflow's own virtualenv (``.venv-airflow``), which has neither
``recsys_spark`` nor ``pyspark``: every stage runs as ``spark-submit <project>/jobs/<stage>.py``
with ``spark-submit`` and the jobs' Python taken from the project's virtualenv
(``<project>/.venv``), and the nearline tasks call the project's ``recsys`` command.

Settings a deployment changes are resolved per run, in this order: the run's params (trigger
form or ``--conf``), an Airflow Variable ``recsys_<name>``, the default below.

========================  ==============================================================
``project``               the recsys-spark checkout with its ``.venv`` (default: the folder
                          above this DAG folder)
``root``                  the lakehouse root (default: ``<project>/lakehouse``)
``config``                a YAML config file for every job (default: none, the jobs' own)
``spark_conn_id``         the Spark connection: ``local[*]`` or a cluster master
                          (default: ``recsys_spark``)
``landing``               where the daily input arrives as ``date=YYYY-MM-DD/`` folders
                          (default: ``<project>/landing``)
========================  ==============================================================
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import BaseHook, BaseSensorOperator, Param, Variable
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowSensorTimeout,
    AirflowSkipException,
)

OWNER = "recsys"
DAG_FOLDER = Path(__file__).resolve().parent

_DEFAULTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "project": lambda params: str(DAG_FOLDER.parent),
    "root": lambda params: str(Path(setting("project", params)) / "lakehouse"),
    "config": lambda params: "",
    "spark_conn_id": lambda params: "recsys_spark",
    "landing": lambda params: str(Path(setting("project", params)) / "landing"),
}

# DAG params of the settings above: empty means "the Variable, else the default".
SETTING_PARAMS: dict[str, Param] = {
    "project": Param(None, type=["null", "string"],
                     description="recsys-spark checkout with its .venv (Variable recsys_project; "
                                 "default: the folder above the DAG folder)"),
    "root": Param(None, type=["null", "string"],
                  description="lakehouse root (Variable recsys_root; default: <project>/lakehouse)"),
    "config": Param(None, type=["null", "string"],
                    description="YAML config file for every job (Variable recsys_config; default: none)"),
    "spark_conn_id": Param(None, type=["null", "string"],
                           description="Spark connection: local[*] or a cluster master (Variable "
                                       "recsys_spark_conn_id; default: recsys_spark)"),
    "overrides": Param([], type="array", items={"type": "string"},
                       description="config overrides passed to every job as --set KEY=VALUE"),
    "driver_memory": Param("2g", type="string", description="spark-submit --driver-memory"),
    "driver_java_options": Param("", type="string",
                                 description="more JVM options of the driver, e.g. -XX:TieredStopAtLevel=1 "
                                             "-XX:+UseSerialGC: half the start-up CPU of a small job"),
}

# Job errors worth another attempt: the rest (bad input, bad config, missing tables) fail at once.
RETRYABLE_ERRORS = frozenset({"TrackingUnavailableError", "CommitFailedError", "EngineUnavailableError"})

DEFAULT_ARGS: dict[str, Any] = {
    "owner": OWNER,
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
}


def setting(name: str, params: dict[str, Any]) -> str:
    """``name`` for this run: its param, else the Variable ``recsys_<name>``, else the default."""
    value = params.get(name)
    if value in (None, ""):
        value = Variable.get(f"recsys_{name}", default=None)
    if value in (None, ""):
        value = _DEFAULTS[name](params)
    return str(value)


def project_venv(params: dict[str, Any]) -> Path:
    venv = Path(setting("project", params)) / ".venv"
    if not (venv / "bin" / "spark-submit").is_file():
        raise AirflowFailException(
            f"no project virtualenv at {venv} (spark-submit missing): run `make setup` in "
            f"{setting('project', params)}, or set the recsys_project Variable")
    return venv


def spark_connection(params: dict[str, Any]) -> str:
    """The connection id, checked to exist: the provider would quietly fall back to YARN."""
    conn_id = setting("spark_conn_id", params)
    try:
        BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise AirflowFailException(
            f"no Airflow connection {conn_id!r}: add one, e.g. `airflow connections add {conn_id} "
            "--conn-type spark --conn-host 'local[*]'` (or spark://HOST with --conn-port 7077)") from None
    return conn_id


def common_args(params: dict[str, Any], master: str) -> list[str]:
    """What every job gets: --json, the root, the config, the master of the connection (so the
    job's own spark.master agrees with spark-submit's) and the run's overrides."""
    args = ["--json", "--root", setting("root", params), "--set", f"spark.master={master}"]
    if setting("config", params):
        args += ["--config", setting("config", params)]
    for override in params.get("overrides") or []:
        args += ["--set", override]
    return args


def driver_conf(params: dict[str, Any], master: str) -> dict[str, str]:
    """The driver JVM's options (spark-submit starts it before the job can configure it): the
    run's ``driver_java_options`` and, in local mode, the project's log settings of local
    sessions (warnings, minus known noise)."""
    options = [params.get("driver_java_options") or ""]
    log4j = Path(setting("project", params)) / "recsys_spark" / "resources" / "log4j2.properties"
    if master.startswith("local") and log4j.is_file():
        options.insert(0, f"-Dlog4j2.configurationFile=file:{log4j}")
    joined = " ".join(o for o in options if o.strip())
    return {"spark.driver.extraJavaOptions": joined} if joined else {}


def job_environment(venv: Path, master: str) -> dict[str, str]:
    """spark-submit and the jobs' Python from the project's venv (local mode: loopback only)."""
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYSPARK_PYTHON": str(venv / "bin" / "python")}
    if master.startswith("local"):
        env["SPARK_LOCAL_IP"] = "127.0.0.1"
    return env


def result_line(line: str) -> dict[str, Any] | None:
    """The job's ``--json`` result if ``line`` is one: a JSON object that is not a log record
    (spark-submit merges the job's standard output and error into one stream)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or {"level", "logger", "event"} <= value.keys():
        return None
    return value


class _ResultCapturingHook(SparkSubmitHook):
    """spark-submit, remembering the job's last ``--json`` line as its output streams by."""

    result: dict[str, Any] | None = None

    def _process_spark_submit_log(self, itr: Any) -> None:
        def watched(lines: Any) -> Any:
            for line in lines:
                found = result_line(line)
                if found is not None:
                    self.result = found
                yield line

        super()._process_spark_submit_log(watched(itr))


class RecsysJobOperator(SparkSubmitOperator):
    """``spark-submit <project>/jobs/<job>.py --json ...`` whose JSON result goes to XCom.

    The job's own error (its ``{"error": ...}`` line) fails the task with that one line; only
    errors in ``RETRYABLE_ERRORS`` and failures without a result (a killed or crashed process)
    are retried. ``job_args`` is templated; arguments that render empty are dropped, so a
    template may leave out an optional flag. ``skip_if`` returns a reason to skip the task.
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "job_args")
    ui_color = "#e8f1fb"

    def __init__(self, *, job: str, job_args: Sequence[str] = (),
                 skip_if: Callable[[Any], str | None] | None = None, **kwargs: Any) -> None:
        super().__init__(name=f"recsys-{job}", **kwargs)
        self.job = job
        self.job_args = list(job_args)
        self.skip_if = skip_if

    def execute(self, context: Any) -> dict[str, Any]:
        params = context["params"]
        reason = self.skip_if(context) if self.skip_if is not None else None
        if reason:
            raise AirflowSkipException(reason)
        venv = project_venv(params)
        self._conn_id = spark_connection(params)
        master = SparkSubmitHook(conn_id=self._conn_id)._connection["master"]
        self._driver_memory = params.get("driver_memory") or None
        self.application = str(Path(setting("project", params)) / "jobs" / f"{self.job}.py")
        self.application_args = [a for a in self.job_args if str(a).strip()] + common_args(params, master)
        self.env_vars = job_environment(venv, master)
        self.conf = {**driver_conf(params, master), **(self.conf or {})}
        self._hook = hook = self._get_hook()
        try:
            super().execute(context)
        except AirflowException as exc:
            result = hook.result or {}
            if "error" in result:
                message = f"{self.job} failed: {result['error']}"
                if result.get("error_type") in RETRYABLE_ERRORS:
                    raise AirflowException(message) from exc
                raise AirflowFailException(message) from exc
            raise
        if hook.result is None:
            raise AirflowException(f"{self.job} printed no JSON result line")
        return hook.result

    def _get_hook(self) -> _ResultCapturingHook:
        hook = super()._get_hook()
        # The stock hook, built from this operator's arguments, plus the capture of the result.
        hook.__class__ = _ResultCapturingHook
        return hook  # type: ignore[return-value]


class DayFolderSensor(BaseSensorOperator):
    """Waits until ``folder`` holds a data file (names starting with ``.`` or ``_`` are not
    data: ingest skips them, and the generator writes into ``.NAME.partial``). The timeout and
    the poke interval come from the run's params ``input_timeout_minutes`` and
    ``input_poke_seconds``; on timeout the task fails, naming the folder."""

    template_fields: Sequence[str] = ("folder",)
    ui_color = "#fdf3e1"

    def __init__(self, *, folder: str, **kwargs: Any) -> None:
        super().__init__(mode="reschedule", **kwargs)
        self.folder = folder

    def execute(self, context: Any) -> Any:
        params = context["params"]
        self.timeout = float(params["input_timeout_minutes"]) * 60
        self.poke_interval = float(params["input_poke_seconds"])
        try:
            return super().execute(context)
        except AirflowSensorTimeout as exc:
            raise AirflowSensorTimeout(
                f"no input arrived in {self.folder} within {self.timeout / 60:g} minutes: nothing to "
                f"ingest for {context['ds']} (is the export late, or is the landing path wrong?)") from exc

    def poke(self, context: Any) -> bool:
        folder = Path(self.folder)
        found = folder.is_dir() and any(
            p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
            for p in folder.rglob("*"))
        self.log.info("%s: %s", self.folder, "input found" if found else "no data file yet")
        return found


def run_recsys(params: dict[str, Any], *args: str, timeout: float = 300) -> dict[str, Any]:
    """``<project>/.venv/bin/recsys <args> --json --root ... --config ...`` (no Spark): its result.

    Raises:
        AirflowException: the command failed; the message is its one-line error.
    """
    venv = project_venv(params)
    argv = [str(venv / "bin" / "recsys"), *args, "--json", "--root", setting("root", params)]
    if setting("config", params):
        argv += ["--config", setting("config", params)]
    for override in params.get("overrides") or []:
        argv += ["--set", override]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    result = result_line(lines[-1]) if lines else None
    if done.returncode != 0 or result is None:
        reason = (result or {}).get("error") or done.stderr.strip()[-2000:] or f"exit code {done.returncode}"
        raise AirflowException(f"recsys {args[0]} failed: {reason}")
    return result
