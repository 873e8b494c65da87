"""Prefect flows: orchestration only; every stage's logic lives in ``store_core``."""
