"""Watching and steering runs from outside the loop: experiment tracking with MLflow (``mlflow.py``) and its
loss-curve plot (``plots.py``), sweeps (``sweep.py``, Optuna), the LR range test (``lr_find.py``), evaluation
reports (``report.py``). MLflow and Optuna are imported only when used."""
