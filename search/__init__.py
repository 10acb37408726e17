"""AutoML orchestrator: Hydra + Ray Tune + Optuna + MLflow search over pruning schedules."""
