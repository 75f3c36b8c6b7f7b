"""The Guided Anchoring experiment pipeline: CLI, config + presets, DAG + cache keys, artifact
store, Ray runtime and training, MLflow tracking. Entry point: ``python -m pipeline``."""
