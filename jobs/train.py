"""spark-submit entry point: train a model under TorchDistributor, log and gate it in MLflow.

    spark-submit jobs/train.py --model sasrec [--root DIR] [--set training.num_processes=4] [--json]
"""

from recsys_spark.cli import run_job

run_job("train")
