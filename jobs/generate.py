"""spark-submit entry point: write a synthetic behaviour log (driver only).

    python jobs/generate.py --users 100000 --items 50000 --days 7 --out data/events.csv
"""

from recsys_spark.cli import run_job

run_job("generate")
