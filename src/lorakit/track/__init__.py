"""Watching and steering runs: experiment tracking with MLflow (``mlflow.py``) and its loss-curve plot
(``plots.py``). MLflow is imported only when a run is tracked."""
