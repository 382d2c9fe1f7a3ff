"""The code file of the MLflow model (models-from-code): MLflow runs it to build the model.

See stages/serving.py: this package is shipped beside it in the model's code/ folder.
"""

from mlflow.models import set_model

from stages.serving import ImageClassifier

set_model(ImageClassifier())
