"""spark-submit entry point: top-K of every user from the champion into serving/recommendations.

    spark-submit jobs/score_batch.py [--root DIR] [--set serving.k=100] [--json]
"""

from recsys_spark.cli import run_job

run_job("score-batch")
