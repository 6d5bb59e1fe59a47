"""The registered pyfunc, logged as code (MLflow's "models from code") rather than a pickle.

MLflow runs this file when a user loads the model with ``mlflow.pyfunc.load_model``; the
platform itself never does (see ``package.load_registered_model``).
"""

from mlflow.models import set_model

from recsys_spark.modeling.package import RecommenderModel

set_model(RecommenderModel())
