"""spark-submit entry point: bronze -> silver ingest of a behaviour log.

    spark-submit jobs/ingest.py --format taobao --input data/events.csv [--root DIR] [--json]
"""

from recsys_spark.cli import run_job

run_job("ingest")
