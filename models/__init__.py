"""Pure PyTorch recommender modules: no Spark, no MLflow, no I/O (see tests/test_layout.py)."""
