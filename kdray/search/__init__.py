"""Hyperparameter search: Ray Tune runs the trials, Optuna samples them, MLflow records them."""
