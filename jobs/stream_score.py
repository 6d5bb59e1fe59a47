"""spark-submit entry point: the nearline Structured Streaming query (runs until stopped).

    spark-submit jobs/stream_score.py [--landing DIR] [--format jsonl] [--root DIR]
"""

from recsys_spark.cli import run_job

run_job("stream")
