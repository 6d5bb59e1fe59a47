"""recsys_daily: one run per day of input, from the day's files to every user's lists."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TriggerRule
from jinja2 import StrictUndefined
from recsys_airflow import DEFAULT_ARGS, SETTING_PARAMS, DayFolderSensor, RecsysJobOperator, setting

# Features, lists and the model of day D are "as of" the end of D (UTC).
END_OF_DAY = "{{ ds }}T23:59:59.999999+00:00"
# The earliest day a backfill can reach (the synthetic log's first day: see the README).
START = pendulum.datetime(2017, 11, 25, tz="UTC")

DOC = """
### recsys_daily — one run per day of input

The run of logical date **D** (it starts once D is over) processes the folder
`<landing>/date=D/` and leaves every user's top-K lists in `serving/recommendations`:

| task | job | writes |
|---|---|---|
| `wait_for_input` | — | nothing: waits (rescheduling itself) until the day's folder holds a data file; fails, naming the folder, after `input_timeout_minutes` |
| `ingest` | `jobs/ingest.py --input <landing>/date=D` | `bronze/events_raw`, `quarantine/events`, `silver/events`, `silver/{user,item}_index`, `ops/ingest_runs` (a file ingested before counts as duplicates) |
| `features` | `jobs/build_features.py --as-of D 23:59:59.999999` | the four `gold/*` tables, `ops/feature_runs` |
| `train` | `jobs/train.py --no-gate --run-key recsys_daily/D` | an MLflow run and a registered challenger; skipped on days that are not training days (`train_every_days`); a rerun of D returns D's run |
| `gate` | `jobs/gate.py --version <train's model_version>` | the registry decision (tags of the version; the `champion` alias moves only if the challenger wins) |
| `score_batch` | `jobs/score_batch.py --generated-at D 23:59:59.999999` | `serving/recommendations` (source batch), `serving/item_embeddings`; runs after a skipped training too |
| `maintain` | `jobs/maintain.py --optimize [--vacuum]` | compacted tables; vacuum on `vacuum_weekday` |

Each task's XCom is its job's JSON result. Rerunning a day (clear, or `airflow dags test`) changes
no table's rows and registers no second model. Settings: params, else Variables `recsys_project`,
`recsys_root`, `recsys_config`, `recsys_spark_conn_id`, `recsys_landing` (see `airflow_dags/README.md`).
"""


def not_a_training_day(context: Any) -> str | None:
    """Why ``train`` skips on this logical date, or None on a training day (every
    ``train_every_days`` days counted from ``train_anchor``)."""
    params = context["params"]
    every = int(params["train_every_days"])
    day = context["logical_date"].date()
    offset = (day - date.fromisoformat(params["train_anchor"])).days % every
    if offset == 0:
        return None
    return (f"not a training day: a challenger is trained every {every} days from {params['train_anchor']}; "
            f"the next on {day + timedelta(days=every - offset)}")


with DAG(
    dag_id="recsys_daily",
    description="ingest -> features -> train -> gate -> score -> maintain, one run per day of input",
    doc_md=DOC,
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=START,
    catchup=False,
    max_active_runs=1,  # days run in order: ingest hands out dictionary ids, gold is "as of" a day
    dagrun_timeout=timedelta(hours=20),
    default_args=DEFAULT_ARGS,
    template_undefined=StrictUndefined,
    user_defined_macros={"setting": setting},
    tags=["recsys", "batch"],
    params={
        **SETTING_PARAMS,
        "landing": Param(None, type=["null", "string"],
                         description="where date=YYYY-MM-DD/ folders arrive (Variable recsys_landing; "
                                     "default: <project>/landing)"),
        "input_format": Param("taobao", enum=["taobao", "jsonl", "sequences"], description="ingest --format"),
        "input_timeout_minutes": Param(360, type="number", exclusiveMinimum=0,
                                       description="how long wait_for_input waits for the day's folder"),
        "input_poke_seconds": Param(300, type="number", exclusiveMinimum=0,
                                    description="how often wait_for_input looks"),
        "model": Param("sasrec", enum=["sasrec", "two_tower", "mf"], description="the challenger's model"),
        "train_every_days": Param(1, type="integer", minimum=1,
                                  description="train a challenger every N days (other days: skipped)"),
        "train_anchor": Param(START.date().isoformat(), type="string", format="date",
                              description="training days are train_anchor + k * train_every_days"),
        "vacuum_weekday": Param(6, type="integer", minimum=0, maximum=6,
                                description="maintain also vacuums on this weekday (0 = Monday)"),
    },
) as dag:
    day_folder = "{{ setting('landing', params) }}/date={{ ds }}"
    wait_for_input = DayFolderSensor(
        task_id="wait_for_input", folder=day_folder, retries=0,
        doc_md="Waits for a data file in `<landing>/date=D/`.")
    ingest = RecsysJobOperator(
        task_id="ingest", job="ingest", job_args=["--format", "{{ params.input_format }}", "--input", day_folder],
        execution_timeout=timedelta(hours=3), doc_md="Ingests exactly the day's folder into bronze/silver.")
    features = RecsysJobOperator(
        task_id="features", job="build_features", job_args=["--as-of", END_OF_DAY],
        execution_timeout=timedelta(hours=3), doc_md="Builds the gold tables as of the end of the day.")
    train = RecsysJobOperator(
        task_id="train", job="train", skip_if=not_a_training_day, execution_timeout=timedelta(hours=8),
        job_args=["--model", "{{ params.model }}", "--no-gate", "--run-key", "recsys_daily/{{ ds }}"],
        doc_md="Trains and registers a challenger (not yet gated); skipped on other than training days.")
    gate = RecsysJobOperator(
        task_id="gate", job="gate", execution_timeout=timedelta(hours=2),
        job_args=["--version", "{{ ti.xcom_pull(task_ids='train')['model_version'] }}"],
        doc_md="Promotes the challenger to champion only if it beats the champion on the same test rows.")
    score_batch = RecsysJobOperator(
        task_id="score_batch", job="score_batch", job_args=["--generated-at", END_OF_DAY],
        trigger_rule=TriggerRule.NONE_FAILED,  # also after a skipped training: the champion scores
        execution_timeout=timedelta(hours=3), doc_md="Every user's top-K from the champion.")
    maintain = RecsysJobOperator(
        task_id="maintain", job="maintain",
        job_args=["--optimize", "{{ '--vacuum' if logical_date.weekday() == params.vacuum_weekday else '' }}"],
        execution_timeout=timedelta(hours=2), doc_md="Compacts every table; vacuums once a week.")

    wait_for_input >> ingest >> features >> train >> gate >> score_batch >> maintain
