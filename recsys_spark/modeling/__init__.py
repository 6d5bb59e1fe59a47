"""What training, evaluation and serving share about models: the registry of trainable models
(``tasks``), gold rows as tensors (``batches``), the Delta -> torch loader (``loader``), the
training data of one gold version (``gold``) and the registered model (``package``)."""
