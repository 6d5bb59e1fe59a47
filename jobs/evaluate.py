"""spark-submit entry point: full-ranking evaluation of a registered model across Spark tasks.

    spark-submit jobs/evaluate.py [--alias champion | --version N] [--split test] [--json]
"""

from recsys_spark.cli import run_job

run_job("evaluate")
