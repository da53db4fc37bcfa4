"""The MLflow "models from code" entry point of the registered student.

``mlflow.pyfunc.log_model(python_model=<this file>)`` stores this script with the model;
loading the model runs it, and ``set_model`` names the object that serves predictions.
"""

import mlflow

from clip_dfkd.serving import StudentPyfunc

mlflow.models.set_model(StudentPyfunc())
