"""spark-submit entry point: train a model under TorchDistributor, log and gate it in MLflow.

    spark-submit jobs/train.py --model sasrec [--no-gate] [--run-key KEY] [--root DIR] [--json]
"""

from recsys_spark.cli import run_job

run_job("train")
