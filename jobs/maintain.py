"""spark-submit entry point: compact and vacuum lakehouse tables.

    spark-submit jobs/maintain.py --optimize --vacuum [silver/events ...]
"""

from recsys_spark.cli import run_job

run_job("maintain")
