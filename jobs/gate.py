"""spark-submit entry point: the registry decision for a challenger registered with --no-gate.

    spark-submit jobs/gate.py [--version N] [--root DIR] [--json]
"""

from recsys_spark.cli import run_job

run_job("gate")
