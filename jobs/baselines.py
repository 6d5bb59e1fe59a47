"""spark-submit entry point: fit and evaluate popularity, item-CF and ALS baselines.

    spark-submit jobs/baselines.py [popularity itemcf als ...] [--root DIR] [--json]
"""

from recsys_spark.cli import run_job

run_job("baselines")
