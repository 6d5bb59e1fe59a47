"""spark-submit entry point: silver -> gold features, sequences and training examples.

    spark-submit jobs/build_features.py [--as-of 2017-12-03T00:00:00] [--silver-version N] [--json]
"""

from recsys_spark.cli import run_job

run_job("features")
